"""``make_app`` and the server's life: build the parts, first refresh, listen, stop cleanly.

:func:`serve` is the pipeline ``token_server.py`` runs:

    bind the port -> the service (server.service: Redis, embedded if no url -> store ->
    upstream client -> refresher, first pass -> events subscription) -> HTTP server listens -> refresh timer runs -> wait for SIGTERM/SIGINT
    -> stop listening -> stop the timer -> finish in-flight requests and fetches
    -> close Redis -> stop the embedded Redis

Each part is built by a small function and passed to the next; nothing is global.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import platform
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import tornado.netutil
import tornado.web
from tornado.httpserver import HTTPServer

from server import __version__, logthrottle
from server.config import Config, ConfigError
from server.embedded_redis import EmbeddedRedis
from server.face import add_face
from server.handlers import NotFoundHandler, log_request
from server.listener import GuardedHTTPServer
from server.ops.reload import ConfigFile, Reloader
from server.platform.handlers import platform_routes, take_proxy
from server.platform.service import Platforms
from server.refresher import Refresher
from server.service import LIMITS_CONNECTIONS, Service, StartupError, shared_limits
from server.store import Store
from server.upstream import Upstream
from server.web.session import Sessions
from server.web.status_page import status_page_routes

__all__ = ["LIMITS_CONNECTIONS", "Running", "Service", "StartupError", "make_app", "serve", "shared_limits", "start", "stop"]

logger = logging.getLogger(__name__)


def make_app(service: Service, sessions: Sessions | None = None) -> tornado.web.Application:
    """The standalone server's HTTP application over a built :class:`Service`: its routes
    (see handlers for each endpoint), then the operator's status page under
    ``/wechat/status/`` (``sessions``; None: no page), then the WeChat-shaped face with its
    API proxy as the catch-all (``face: true``, see server.face)."""
    deps = service.deps
    # --- third-party platforms (server.platform): first, as they take over /wechat/token for authorizer appids ---
    own = platform_routes(service.platforms, deps) if service.platforms is not None else []
    app = tornado.web.Application(
        own + service.routes(),
        default_handler_class=NotFoundHandler,
        default_handler_args=deps,
        log_function=log_request,
        compress_response=False,
    )
    # --- the operator's status page (server.web), before the face's catch-all proxy ---
    if sessions is not None:
        more = service.platforms.page_summary if service.platforms is not None else None
        app.wildcard_router.add_rules(status_page_routes(sessions, deps, more=more))
    # --- the WeChat-shaped face (server.face) ---
    if service.face is not None:
        add_face(app, service.face, deps)
    # --- the API proxy also takes authorizers' tokens (server.platform) ---
    if service.platforms is not None:
        take_proxy(app, service.platforms, service.face, deps)
    return app


@dataclass
class Running:
    """A running standalone server: the service, and the HTTP server in front of it."""

    http: HTTPServer
    service: Service
    port: int
    sessions: Sessions
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    #: takes the log throttle (server.logthrottle) off again
    unthrottle: Callable[[], None] = lambda: None

    @property
    def refresher(self) -> Refresher:
        return self.service.refresher

    @property
    def store(self) -> Store:
        return self.service.store

    @property
    def upstream(self) -> Upstream:
        return self.service.upstream

    @property
    def embedded(self) -> EmbeddedRedis | None:
        return self.service.embedded

    @property
    def platforms(self) -> Platforms | None:
        return self.service.platforms


async def start(cfg: Config, config_file: ConfigFile | None = None, sockets: list[socket.socket] | None = None) -> Running:
    """Build every part, run the first refresh pass, then listen.  See the module docstring.

    The port is bound before the first pass (a taken port must not cost an upstream call)
    but served only after it.  If anything fails, what was started is stopped again.
    ``config_file``: where ``cfg`` came from, read again by a reload (None: no reload).
    ``sockets``: already bound by the supervisor of ``--workers`` (server.workers).
    """
    logger.info("wechat-token-server %s starting (Python %s)", __version__, platform.python_version())
    sockets = sockets or bind(cfg.server.host, cfg.server.port)
    try:
        service = await Service.open(cfg)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    sessions = Sessions(cfg.server.secret, service.auth)
    service.sessions = sessions  # a reload gives the page the new server.secret
    if config_file is not None:
        service.reloader = Reloader(service, config_file.path, config_file.read)
    # The API takes no body (the status page's login and refresh: a few bytes): refuse big
    # ones early, and do not wait long for slow ones.
    # Refused peers are closed at accept, heads get server.header_timeout (server.listener).
    http = GuardedHTTPServer(
        make_app(service, sessions),
        admit=service.auth.accepts_peer,
        header_timeout=cfg.server.header_timeout,
        max_body_size=4096,
        body_timeout=10,
    )
    http.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    logger.info("listening on http://%s:%d (wechat-token-server %s)", cfg.server.host, port, __version__)
    return Running(http, service, port, sessions, unthrottle=logthrottle.install())


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


async def stop(running: Running, timeout: float) -> None:
    """Stop in reverse order; in-flight requests and fetches get ``timeout`` seconds."""
    running.http.stop()  # no new connections
    await running.service.drain(timeout)
    try:
        await asyncio.wait_for(running.http.close_all_connections(), 1.0)  # idle keep-alive ones
    except asyncio.TimeoutError:
        pass
    await running.service.close()
    running.stopped.set()
    logger.info("stopped")
    running.unthrottle()


async def serve(cfg: Config, on_ready: Callable[[Running], Awaitable[None] | None] | None = None, config_file: ConfigFile | None = None,
                sockets: list[socket.socket] | None = None) -> int:
    """Run until SIGTERM or SIGINT; SIGHUP reloads ``config_file`` (see server.ops.reload).
    Returns the exit code."""
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    reloads: set[asyncio.Future[Any]] = set()
    pending = asyncio.Event()  # a SIGHUP that came while starting: the reload runs once started
    running: Running | None = None

    def hup() -> None:
        if running is None:
            logger.info("SIGHUP while starting: the config is reloaded once the server is up")
            pending.set()
            return
        reloader = running.service.reloader
        if reloader is None:
            logger.warning("SIGHUP: this server was started without a config file (--demo): nothing to reload")
            return
        logger.info("SIGHUP: reloading %s", reloader.path)
        task = asyncio.ensure_future(_quietly(reloader.reload()))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Before anything else: a SIGHUP's default action would end the process mid-fetch.
    loop.add_signal_handler(signal.SIGHUP, hup)
    try:
        running = await start(cfg, config_file, sockets)
    except BaseException:
        _ignore_sighup(loop)
        raise
    try:
        if pending.is_set():
            hup()
        if on_ready is not None:
            result = on_ready(running)
            if result is not None:
                await result
        await shutdown.wait()
        logger.info("shutdown requested")
    finally:
        timeout = running.service.cfg.server.shutdown_timeout
        loop.add_signal_handler(signal.SIGHUP, lambda: logger.warning("SIGHUP while stopping: no reload"))
        if reloads:
            await asyncio.wait(reloads, timeout=timeout)  # a reload under way finishes before the parts close
        await stop(running, timeout)
        _ignore_sighup(loop)
    return 0


def _ignore_sighup(loop: asyncio.AbstractEventLoop) -> None:
    """After the loop's handler: SIGHUP ignored (removing it would restore the default, which kills)."""
    loop.remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def _quietly(reload: Awaitable[Any]) -> None:
    """A reload from a signal: a refused file is already logged (one line), nothing to raise."""
    try:
        await reload
    except ConfigError:
        pass

