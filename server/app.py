"""``make_app`` and the server's life: build the parts, first refresh, listen, stop cleanly.

:func:`serve` is the pipeline ``token_server.py`` runs:

    Redis (embedded if no url) -> store -> upstream client -> refresher (first pass)
    -> HTTP server listens -> refresh timer runs -> wait for SIGTERM/SIGINT
    -> stop listening -> stop the timer -> finish in-flight requests and fetches
    -> close Redis -> stop the embedded Redis

Each part is built by a small function and passed to the next; nothing is global.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import platform
import signal
import socket
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import tornado.netutil
import tornado.web
from redis.exceptions import RedisError
from tornado.httpserver import HTTPServer

from server import __version__, logthrottle
from server.accounts import Accounts
from server.auth import Authenticator
from server.config import Config, ConfigError
from server.embedded_redis import EmbeddedRedis, EmbeddedRedisError
from server.face import Face, add_face
from server.handlers import (
    ActiveRequests,
    ForceRefreshHandler,
    HealthHandler,
    MetricsHandler,
    NotFoundHandler,
    StatusHandler,
    TokenHandler,
    log_request,
)
from server.jssdk_handler import JssdkConfigHandler, public_limits
from server.listener import GuardedHTTPServer
from server.ops.quota import DailyCalls
from server.ops.readiness import Readiness, ReadyHandler
from server.ratelimit import SharedLimit
from server.refresher import Refresher
from server.sources import Source
from server.store import Store, build_redis
from server.upstream import Upstream
from server.web.session import Sessions
from server.web.status_page import status_page_routes

logger = logging.getLogger(__name__)


def make_app(
    refresher: Refresher,
    auth: Authenticator,
    active: ActiveRequests,
    accounts: Accounts,
    jssdk_limits: Mapping[str, SharedLimit] | None = None,
    face: Face | None = None,
    readiness: Readiness | None = None,
    sessions: Sessions | None = None,
) -> tornado.web.Application:
    """The HTTP application over built parts (see handlers for each endpoint).

    ``readiness`` (None: one over the refresher's own store) answers ``/readyz`` (see
    server.ops.readiness).

    ``jssdk_limits``: the per-IP limit of each account whose JS-SDK signing is public (see
    server.jssdk_handler); an account without one is not served publicly.  ``face`` (None:
    ``face: false``) adds the WeChat-shaped face after these routes, which keep precedence
    (see server.face).  ``sessions`` (None: no page) adds the operator's status page under
    ``/wechat/status/`` (see server.web).
    """
    deps = {"refresher": refresher, "auth": auth, "active": active, "accounts": accounts}
    app = tornado.web.Application(
        [
            (r"/wechat/token", TokenHandler, deps),
            (r"/wechat/token/forcerefresh", ForceRefreshHandler, deps),
            (r"/wechat/jssdk/config", JssdkConfigHandler, {**deps, "public_limits": jssdk_limits or {}}),
            (r"/healthz", HealthHandler, deps),
            (r"/readyz", ReadyHandler, {**deps, "readiness": readiness or Readiness(refresher.store, refresher)}),
            (r"/status", StatusHandler, deps),
            (r"/metrics", MetricsHandler, deps),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        compress_response=False,
    )
    # --- the operator's status page (server.web), before the face's catch-all proxy ---
    if sessions is not None:
        app.wildcard_router.add_rules(status_page_routes(sessions, deps))
    # --- the WeChat-shaped face (server.face) ---
    if face is not None:
        add_face(app, face, deps)
    return app


@dataclass
class Running:
    """The parts of a running server, in the order they are stopped."""

    http: HTTPServer
    active: ActiveRequests
    refresher: Refresher
    store: Store
    limits_redis: aioredis.Redis  # the rate limits' own connections (see shared_limits)
    upstream: Upstream
    embedded: EmbeddedRedis | None
    port: int
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    #: takes the log throttle (server.logthrottle) off again
    unthrottle: Callable[[], None] = lambda: None
    #: the WeChat-shaped face (None: ``face: false``); its HTTP client is closed at stop
    face: Face | None = None
    #: the daily call counts (server.ops.quota); counts under way finish before Redis closes
    calls: DailyCalls | None = None


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


async def start(cfg: Config) -> Running:
    """Build every part, run the first refresh pass, then listen.  See the module docstring.

    The port is bound before the first pass (a taken port must not cost an upstream call)
    but served only after it.  If anything fails, what was started is stopped again.
    """
    logger.info("wechat-token-server %s starting (Python %s)", __version__, platform.python_version())
    url, embedded = redis_url(cfg)
    store: Store | None = None
    limits_redis: aioredis.Redis | None = None
    upstream: Upstream | None = None
    face: Face | None = None
    sockets: list[socket.socket] = []
    try:
        sockets = bind(cfg.server.host, cfg.server.port)
        store = Store(build_redis(cfg.redis, url), cfg.redis.prefix, instance=f"{socket.gethostname()}:{os.getpid()}")
        await check_redis(store, cfg, url)
        upstream = Upstream(cfg.refresh.timeout)
        sources = {name: Source(src) for name, src in cfg.sources.items()}
        calls = DailyCalls(store.redis, cfg.redis.prefix, {name: src.daily_quota for name, src in cfg.sources.items()})
        refresher = Refresher(sources, store, upstream, cfg.refresh, calls=calls)
        started = time.monotonic()
        await refresher.start()
        logger.info("first refresh pass done in %.2fs: %s", time.monotonic() - started, _summary(refresher))
        active = ActiveRequests()
        limits_redis = build_redis(cfg.redis, url, max_connections=LIMITS_CONNECTIONS)
        auth = Authenticator(cfg, *shared_limits(limits_redis, cfg))
        accounts = Accounts.from_config(cfg)
        face = Face.build(refresher, accounts, cfg.refresh.overlap) if cfg.face else None
        # The API takes no body (the status page's login and refresh: a few bytes): refuse big
        # ones early, and do not wait long for slow ones.
        # Refused peers are closed at accept, heads get server.header_timeout (server.listener).
        http = GuardedHTTPServer(
            make_app(
                refresher, auth, active, accounts, public_limits(limits_redis, cfg.redis.prefix, accounts), face,
                Readiness(store, refresher), Sessions(cfg.server.secret, auth),
            ),
            admit=auth.accepts_peer,
            header_timeout=cfg.server.header_timeout,
            max_body_size=4096,
            body_timeout=10,
        )
        http.add_sockets(sockets)
    except BaseException:
        for sock in sockets:
            sock.close()
        if store is not None:
            await store.close()
        if limits_redis is not None:
            await limits_redis.aclose(close_connection_pool=True)
        if upstream is not None:
            upstream.close()
        if face is not None:
            face.close()
        if embedded is not None:
            embedded.stop()
        raise
    port = sockets[0].getsockname()[1]
    logger.info("listening on http://%s:%d (wechat-token-server %s)", cfg.server.host, port, __version__)
    return Running(http, active, refresher, store, limits_redis, upstream, embedded, port, unthrottle=logthrottle.install(), face=face, calls=calls)


def bind(host: str, port: int) -> list[socket.socket]:
    """The listening sockets; StartupError naming the port when it cannot be had (the
    kernel's "Address already in use" does not say which address)."""
    try:
        return tornado.netutil.bind_sockets(port, host)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise StartupError(f"port {port} is already in use on {host}; stop the other process or choose another port (--port, server.port)") from None
        if e.errno == errno.EACCES:
            raise StartupError(f"port {port} on {host}: permission denied (ports below 1024 need privileges); use a port above 1023 behind nginx") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise StartupError(f"server.host {host} is no address of this machine; use 127.0.0.1 or one of its addresses") from None
        raise


#: Connections the rate limits may use, apart from the store's: a flood of requests that
#: have not authenticated must never take the connections the refresher and reads need.
LIMITS_CONNECTIONS = 8


def shared_limits(redis: aioredis.Redis, cfg: Config) -> tuple[SharedLimit, SharedLimit]:
    """The failed-authentication and forced-refresh limits, counted in ``redis`` (a client of
    its own: see LIMITS_CONNECTIONS)."""
    return (
        SharedLimit(redis, cfg.redis.prefix, "auth-failures", cfg.server.auth_failures_per_minute),
        SharedLimit(redis, cfg.redis.prefix, "forcerefresh", cfg.server.forcerefresh_per_minute),
    )


class StartupError(Exception):
    """The server cannot start; ``str()`` is one line saying what to fix (no secret)."""


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


def _summary(refresher: Refresher) -> str:
    return ", ".join(f"{n}={s['state']}/{s['expires_in']}s" for n, s in refresher.status().items())


async def stop(running: Running, timeout: float) -> None:
    """Stop in reverse order; in-flight requests and fetches get ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    running.http.stop()  # no new connections
    running.refresher.stop()  # no new ticks or retries
    if not await running.active.wait_idle(timeout):
        logger.warning("shutdown: %d requests still open after %.0fs; closing them", len(running.active.handlers), timeout)
    await running.refresher.drain(max(0.1, deadline - time.monotonic()))  # releases held locks
    if running.calls is not None:
        await running.calls.drain(1.0)  # the last calls' counts, while Redis is still open
    try:
        await asyncio.wait_for(running.http.close_all_connections(), 1.0)  # idle keep-alive ones
    except asyncio.TimeoutError:
        pass
    await running.store.close()
    await running.limits_redis.aclose(close_connection_pool=True)
    running.upstream.close()
    if running.face is not None:
        running.face.close()
    if running.embedded is not None:
        running.embedded.stop()
    running.stopped.set()
    logger.info("stopped")
    running.unthrottle()


async def serve(cfg: Config, on_ready: Callable[[Running], Awaitable[None] | None] | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the exit code."""
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    running = await start(cfg)
    try:
        if on_ready is not None:
            result = on_ready(running)
            if result is not None:
                await result
        await shutdown.wait()
        logger.info("shutdown requested")
    finally:
        await stop(running, cfg.server.shutdown_timeout)
    return 0

