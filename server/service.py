"""The token service without its listening socket: what the standalone server runs, and what
a Tornado application embeds.

:meth:`Service.open` builds every part from a validated config and runs the first refresh
pass; :meth:`Service.routes` gives the HTTP handlers to mount (under a path prefix when
embedded, see server.embed); :meth:`Service.reload` applies a new config to the running
parts (server.ops.reload); :meth:`Service.close` stops them in reverse order.  The
standalone server (server.app) adds the listening socket, the status page and the API
proxy around the same object, so both have the same guarantees (one lock, fencing, one
upstream call per rotation across every instance and embedding).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.accounts import Accounts
from server.auth import Authenticator
from server.config import Config, ConfigError
from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from server.face import Face
from server.handlers import ActiveRequests
from server.jssdk_handler import public_limits
from server.ops.events import Subscriber
from server.ops.quota import DailyCalls
from server.ops.readiness import Readiness
from server.ops.webhooks import SHUTDOWN_WAIT, Webhooks
from server.platform.service import Platforms
from server.ratelimit import SharedLimit
from server.redis_client import build_redis
from server.refresher import Refresher
from server.sources import Source
from server.store import Store
from server.upstream import Upstream

if TYPE_CHECKING:
    from server.ops.reload import Reloader
    from server.web.session import Sessions

logger = logging.getLogger(__name__)

#: Connections the rate limits may use, apart from the store's: a flood of requests that
#: have not authenticated must never take the connections the refresher and reads need.
LIMITS_CONNECTIONS = 8


class StartupError(Exception):
    """The server cannot start; ``str()`` is one line saying what to fix (no secret)."""


@dataclass
class Service:
    """The running parts (see the module docstring).  Attributes are read by the handlers
    through ``deps``; a reload updates the objects in place, so every handler sees the new
    config at its next request."""

    cfg: Config
    store: Store
    limits_redis: aioredis.Redis  # the rate limits' own connections (see shared_limits)
    upstream: Upstream
    refresher: Refresher
    auth: Authenticator
    accounts: Accounts
    active: ActiveRequests
    calls: DailyCalls
    readiness: Readiness
    subscriber: Subscriber
    jssdk_limits: dict[str, SharedLimit]
    face: Face | None
    embedded: EmbeddedRedis | None
    url: str | None
    #: third-party platforms (server.platform; None: no kind: component account)
    platforms: Platforms | None = None
    #: the status page's sessions, rekeyed by a reload (None: no page, e.g. an embedding)
    sessions: Sessions | None = None
    #: reads the config file again (None: started without a file, e.g. --demo)
    reloader: Reloader | None = None
    webhooks: Webhooks | None = None  # server.ops.webhooks; None only for a Service built by hand

    @property
    def deps(self) -> dict[str, Any]:
        """What every handler is given (``initialize(**deps)``)."""
        return {"refresher": self.refresher, "auth": self.auth, "active": self.active, "accounts": self.accounts}

    @classmethod
    async def open(cls, cfg: Config) -> Service:
        """Build every part and run the first refresh pass.  If anything fails, what was
        started is stopped again.  Raises StartupError or ConfigError (one line)."""
        url, embedded = redis_url(cfg)
        store: Store | None = None
        limits_redis: aioredis.Redis | None = None
        upstream: Upstream | None = None
        subscriber: Subscriber | None = None
        webhooks: Webhooks | None = None
        platforms: Platforms | None = None
        try:
            accounts = Accounts.from_config(cfg)
            store = Store(build_redis(cfg.redis, url), cfg.redis.prefix, instance=f"{socket.gethostname()}:{os.getpid()}",
                          owners=owners(accounts))
            await check_redis(store, cfg, url)
            upstream = Upstream(cfg.refresh.timeout)
            sources = {name: Source(src) for name, src in cfg.sources.items()}
            # --- third-party platforms (server.platform): component-token sources that carry the verify ticket ---
            platforms = Platforms.build(cfg, store, sources)
            if platforms is not None:
                await platforms.load()
            calls = DailyCalls(store.redis, cfg.redis.prefix, {name: src.daily_quota for name, src in cfg.sources.items()})
            refresher = Refresher(sources, store, upstream, cfg.refresh, calls=calls)
            subscriber = Subscriber(store.redis, store.channel)
            # Memory serves reads while the subscription tells of every rotation (server.mirror).
            mirror = refresher.mirror
            subscriber.listen(lambda event: mirror.on_event(event.source), mirror.on_subscribed)
            mirror.events_live = subscriber.subscribed.is_set
            # --- webhooks (server.ops.webhooks): subscribed before the first pass, whose rotations are told too ---
            webhooks = Webhooks(store.redis, cfg.redis.prefix, store.instance, refresher.metrics)
            webhooks.configure(cfg)
            subscriber.listen(webhooks.on_event)
            await subscriber.start()
            # ---
            started = time.monotonic()
            await refresher.start()
            logger.info("first refresh pass done in %.2fs: %s", time.monotonic() - started, summary(refresher))
            if platforms is not None:
                platforms.start(refresher)  # the authorizers' schedule (server.platform)
            limits_redis = build_redis(cfg.redis, url, max_connections=LIMITS_CONNECTIONS)
            auth = Authenticator(cfg, *shared_limits(limits_redis, cfg))
            face = Face.build(refresher, accounts, cfg.refresh.overlap) if cfg.face else None
            return cls(
                cfg, store, limits_redis, upstream, refresher, auth, accounts, ActiveRequests(), calls, Readiness(store, refresher, explain=platforms.explain if platforms is not None else None),
                subscriber, public_limits(limits_redis, cfg.redis.prefix, accounts), face, embedded, url, webhooks=webhooks,
                platforms=platforms,
            )
        except BaseException:
            if platforms is not None:
                platforms.stop()
                platforms.close()
            if webhooks is not None:
                await webhooks.stop(0)
            if subscriber is not None:
                await subscriber.stop()
            if store is not None:
                await store.close()
            if limits_redis is not None:
                await limits_redis.aclose(close_connection_pool=True)
            if upstream is not None:
                upstream.close()
            if embedded is not None:
                embedded.stop()
            raise

    def routes(self, prefix: str = "") -> list[Any]:
        """The API's routes under ``prefix`` ("" or "/path" without a trailing slash): the
        token and forced-refresh endpoints, JS-SDK signing, health, readiness, status, metrics
        and the operator's reload (see server.handlers for each)."""
        from server.handlers import ForceRefreshHandler, HealthHandler, MetricsHandler, StatusHandler, TokenHandler
        from server.jssdk_handler import JssdkConfigHandler
        from server.ops.readiness import ReadyHandler
        from server.ops.reload import ReloadHandler

        deps = self.deps
        return [
            (prefix + r"/wechat/token", TokenHandler, deps),
            (prefix + r"/wechat/token/forcerefresh", ForceRefreshHandler, deps),
            (prefix + r"/wechat/jssdk/config", JssdkConfigHandler, {**deps, "public_limits": self.jssdk_limits}),
            (prefix + r"/healthz", HealthHandler, deps),
            (prefix + r"/readyz", ReadyHandler, {**deps, "readiness": self.readiness}),
            (prefix + r"/status", StatusHandler, deps),
            (prefix + r"/metrics", MetricsHandler, deps),
            (prefix + r"/admin/reload", ReloadHandler, {**deps, "service": self}),
        ]

    async def drain(self, timeout: float) -> None:
        """Stop refreshing; in-flight requests and fetches get ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        self.refresher.stop()  # no new ticks or retries
        if self.platforms is not None:
            self.platforms.stop()  # no new claims of authorizers
        if not await self.active.wait_idle(timeout):
            logger.warning("shutdown: %d requests still open after %.0fs; closing them", len(self.active.handlers), timeout)
        await self.refresher.drain(max(0.1, deadline - time.monotonic()))  # releases held locks
        if self.platforms is not None:
            await self.platforms.drain(max(0.1, deadline - time.monotonic()))  # unfinished claims expire by themselves
        await self.calls.drain(1.0)  # the last calls' counts, while Redis is still open
        if self.webhooks is not None:  # POSTs under way get a bounded wait, then are dropped (server.ops.webhooks)
            await self.webhooks.stop(min(SHUTDOWN_WAIT, max(0.5, deadline - time.monotonic())))

    async def close(self) -> None:
        """Close every connection (after :meth:`drain`)."""
        if self.webhooks is not None:
            await self.webhooks.stop(0)  # already stopped by drain(); here when drain() was skipped
        await self.subscriber.stop()
        await self.store.close()
        await self.limits_redis.aclose(close_connection_pool=True)
        self.upstream.close()
        if self.face is not None:
            self.face.close()
        if self.platforms is not None:
            self.platforms.close()
        if self.embedded is not None:
            self.embedded.stop()


def owners(accounts: Accounts) -> dict[str, str]:
    """Source -> the account it belongs to, as events name it."""
    return {source: a.name for a in accounts.by_name.values() for source in a.sources.values()}


def redis_url(cfg: Config) -> tuple[str | None, EmbeddedRedis | None]:
    """The Redis URL to use, starting an embedded redis-server when none is configured."""
    if cfg.redis.url is not None or cfg.redis.sentinel is not None:
        return cfg.redis.url, None
    try:
        os.makedirs(cfg.redis.data_dir, mode=0o700, exist_ok=True)
        if not os.access(cfg.redis.data_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        # Under the systemd unit ./data is read-only: a config error (exit 2, not retried by
        # Restart=), not a transient failure.
        raise ConfigError(f"redis.data_dir: cannot use {cfg.redis.data_dir!r} for the embedded Redis ({e.strerror or e}); "
                          "point it at a writable directory, e.g. /var/lib/wechat-token-server (the unit's StateDirectory)") from None
    try:
        embedded = EmbeddedRedis(cfg.redis.data_dir, cfg.redis.port)
        url = embedded.start()
    except (EmbeddedRedisError, OSError) as e:
        raise StartupError(f"cannot start the embedded Redis: {e}") from None
    logger.info("embedded redis-server started: direct readers use %s (redis-cli -p %d GET access_token)", url, embedded.port)
    return url, embedded


def shared_limits(redis: aioredis.Redis, cfg: Config) -> tuple[SharedLimit, SharedLimit]:
    """The failed-authentication and forced-refresh limits, counted in ``redis`` (a client of
    its own: see LIMITS_CONNECTIONS)."""
    return (
        SharedLimit(redis, cfg.redis.prefix, "auth-failures", cfg.server.auth_failures_per_minute),
        SharedLimit(redis, cfg.redis.prefix, "forcerefresh", cfg.server.forcerefresh_per_minute),
    )


async def check_redis(store: Store, cfg: Config, url: str | None) -> None:
    """Refuse to start on a Redis we cannot use: without it there is no lock, and every
    instance (or restart) would fetch its own token."""
    where = "redis.sentinel" if cfg.redis.sentinel else _safe_url(url or "")
    try:
        await store.ping()
    except RedisError as e:
        raise StartupError(f"cannot use Redis at {where}: {type(e).__name__}: {_first_line(e)}; check redis.url / redis.password") from None
    if not cfg.redis.cluster and await _is_cluster_node(store):
        raise StartupError(f"the Redis at {where} is a node of a Redis Cluster; set redis.cluster: true")


async def _is_cluster_node(store: Store) -> bool:
    """Whether a plain client talks to a Redis Cluster node (it would get MOVED for every key
    of another node's slots).  A Redis that refuses INFO (some cloud proxies) is taken as none."""
    try:
        return bool((await store.redis.info("cluster")).get("cluster_enabled"))
    except RedisError:
        return False


def _safe_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def summary(refresher: Refresher) -> str:
    return ", ".join(f"{n}={s['state']}/{s['expires_in']}s" for n, s in refresher.status().items())
