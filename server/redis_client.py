"""The Redis client this server uses: one for a single Redis (a blocking pool), Sentinel, or a
Redis Cluster (:class:`ClusterClient`, which keeps the plain client's contract), built by
:func:`build_redis` from ``redis:``.  The key layout and the scripts are server.store's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, ClusterPubSub, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ClusterError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.config import RedisConfig

#: Connections to Redis per process.  Reads of one source are coalesced by the refresher,
#: so this bounds concurrent commands across sources, locks and scripts.
MAX_CONNECTIONS = 50


def build_redis(cfg: RedisConfig, url: str | None = None, max_connections: int = MAX_CONNECTIONS) -> aioredis.Redis:
    """A redis.asyncio client for ``url`` (default: cfg.url), for cfg.sentinel, or, with
    ``cfg.cluster``, a :class:`ClusterClient` that discovers the cluster from ``url``'s node.

    Commands fail fast (one quick retry, ``socket_timeout`` seconds) so a Redis outage
    turns into a fallback to memory instead of hung requests.
    """
    common: dict[str, Any] = dict(
        socket_timeout=cfg.socket_timeout,
        socket_connect_timeout=cfg.socket_timeout,
        decode_responses=True,
        # One quick retry for a connection reset (a restarted Redis), none for a timeout:
        # a hung Redis must cost one socket_timeout, not two.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=30,
    )
    if cfg.password is not None:
        common["password"] = cfg.password
    if cfg.sentinel is not None:
        from redis.asyncio.sentinel import Sentinel

        hosts = [(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in cfg.sentinel.hosts]
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": cfg.socket_timeout}
        if cfg.sentinel.sentinel_password:
            sentinel_kwargs["password"] = cfg.sentinel.sentinel_password
        if cfg.sentinel.password is not None:
            common["password"] = cfg.sentinel.password
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **common)
        # The sentinel pool does not block: give it room for a burst instead.
        return sentinel.master_for(cfg.sentinel.service_name, max_connections=10 * max_connections, **common)
    target = url or cfg.url
    assert target, "build_redis needs a URL or a sentinel config"
    if cfg.cluster:
        # Connections per node.  The cluster client's pools do not block (a burst past the
        # limit fails with MaxConnectionsError, a RedisError): give them room, as Sentinel's.
        # The retry also re-reads the slot map after a node fails (a failover promotes its
        # replica within cluster-node-timeout); reads meanwhile come from memory.
        # Typed as the plain client: it has the same commands, and Store picks its key layout
        # by the client's class (Keys.of).
        return ClusterClient.from_url(target, max_connections=10 * max_connections, **common)  # type: ignore[return-value]
    # Blocking pool: a burst of requests waits (socket_timeout at most) for one of
    # MAX_CONNECTIONS connections instead of failing with MaxConnectionsError.
    pool = aioredis.BlockingConnectionPool.from_url(target, max_connections=max_connections, timeout=cfg.socket_timeout, **common)
    return aioredis.Redis(connection_pool=pool)


class ClusterClient(RedisCluster):
    """redis-py's asyncio RedisCluster, with the contract of the plain client this server
    relies on: every failure is a RedisError (RedisCluster raises RedisClusterException, which
    is not one, when no node answers or the slots are not covered: callers would not fall back
    to memory), and ``aclose(close_connection_pool=...)`` is accepted (it closes every node's
    connections either way)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            if self._initialize:
                # redis-py 8.1 chooses how to route a command before it reads the slot map: a
                # burst of commands while the map is (re)read goes to arbitrary nodes, and the
                # MOVED answers make it close every connection, in-use ones included (the
                # commands then fail with AttributeError).  Read the map first (once: locked).
                await self.initialize()
            return await super().execute_command(*args, **kwargs)
        except RedisClusterException as e:
            raise ClusterError(f"{type(e).__name__}: {e}") from e
        except AttributeError as e:
            raise _closed_under(e) from e

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused by redis-py, as it says
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own ClusterPipeline

    def pubsub(self, node: Any | None = None, host: str | None = None, port: int | None = None, **kwargs: Any) -> ClusterPubSub:
        return _ClusterPubSub(self, node=node, host=host, port=port, **kwargs)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose()


class _ClusterPubSub(ClusterPubSub):
    """redis-py 8.1's cluster pubsub (SUBSCRIBE on the master of the channel's slot; a PUBLISH on
    any node reaches it), which reads the slot map before it subscribes (without one it fails
    with KeyError) and has it read again once its node failed: redis-py keeps subscribing to
    the node its map names, and only the failure of a keyed command refreshes that map, so a
    subscriber whose node died stayed unsubscribed (20 s and more in a test) while the cluster
    had long promoted the replica.  Its failures are RedisErrors, as :class:`ClusterClient`'s."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self._minded():
            return await super().execute_command(*args, **kwargs)

    async def get_message(self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0) -> Any:
        async with self._minded():
            return await super().get_message(ignore_subscribe_messages, timeout)

    @contextlib.asynccontextmanager
    async def _minded(self) -> AsyncIterator[None]:
        cluster: Any = self.cluster
        try:
            if cluster._initialize:
                await cluster.initialize()
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError):
            cluster._initialize = True  # the next subscription reads the map again
            raise
        except RedisClusterException as e:
            raise ClusterError(f"{type(e).__name__}: {e}") from e
        except AttributeError as e:
            cluster._initialize = True
            raise _closed_under(e) from e


class _ClusterPipeline(ClusterPipeline):
    """A cluster pipeline (without MULTI: split by node, one round trip to each) whose failures
    are RedisErrors, as :class:`ClusterClient`'s."""

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except RedisClusterException as e:
            raise ClusterError(f"{type(e).__name__}: {e}") from e
        except AttributeError as e:
            raise _closed_under(e) from e


def _closed_under(e: AttributeError) -> RedisConnectionError:
    """redis-py 8.1's cluster client closes every connection, in-use ones included, when it
    re-reads the slot map after some errors (a pipeline's retry, CLUSTERDOWN, a run of MOVED);
    a command caught mid-way then fails with AttributeError on the connection's closed socket
    (``'NoneType' object has no attribute 'writelines'``: twice in 10,000 commands during a
    failover under load).  Only redis-py's code runs under these calls: it is a lost connection."""
    return RedisConnectionError(f"connection closed under the command by the cluster client ({e})")
