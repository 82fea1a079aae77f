#!/usr/bin/env python3
"""wechat-token-server: the central control server (中控服务器) for WeChat credentials.

    python token_server.py --config config.yaml     # run
    python token_server.py --config config.yaml --check
    python token_server.py --demo                   # embedded Redis + WeChat sandbox

Exit codes: 0 after a clean shutdown or a good --check, 2 for a config error, 1 when
the server cannot start (Redis, port).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from server import __version__
from server.config import LOG_LEVELS, Config, ConfigError, check_log_level, check_port
from server.config_file import load_config, parse_config

if TYPE_CHECKING:
    from server.ops.reload import ConfigFile

logger = logging.getLogger("token_server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="token_server.py", description="Central control server for WeChat access_token and JS-SDK ticket.")
    p.add_argument("-c", "--config", default="./config.yaml", help="YAML config file (default: ./config.yaml)")
    p.add_argument("--check", action="store_true", help="validate the config and exit: 0 when good, 2 with the bad key")
    p.add_argument("--demo", action="store_true", help="run on an embedded Redis against the built-in WeChat sandbox")
    p.add_argument("--port", type=int, default=None, help="override server.port (1-65535)")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop: asyncio (default) or uvloop (pip install uvloop; measured: no consistent gain, see README)")
    p.add_argument("--workers", type=int, default=1, help="server processes on the port (default 1; about one per core), supervised by this one")
    p.add_argument("--version", action="version", version=f"wechat-token-server {__version__}", help="print the version and exit")
    p.add_argument("--log-level", default=None, help=f"{', '.join(LOG_LEVELS)} (default: $LOG_LEVEL, else INFO)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The flags under the config's rules (server.config): ConfigError, one line, exit 2.

    argparse's own refusal would print the usage too, and ``type=int`` alone lets 99999
    through to the kernel, which binds it modulo 65536."""
    if args.port is not None:
        check_port("--port", args.port)
    if not 1 <= args.workers <= 64:
        raise ConfigError(f"--workers: {args.workers} is not between 1 and 64 (about one per core)")
    if args.demo and args.workers != 1:
        raise ConfigError("--workers: the demo runs one process; use --workers with --config")
    if args.log_level is not None:
        args.log_level = check_log_level("--log-level", args.log_level)
    else:
        args.log_level = check_log_level("LOG_LEVEL (environment)", os.environ.get("LOG_LEVEL") or "INFO")


def setup_logging(level: str, cfg: Config | None = None, to_file: bool = True) -> logging.Filter | None:
    """Log per ``cfg.logging`` (before a config: text on stderr); with ``cfg``, mask its
    secrets in every record (server.redact).

    Called once at start (no config yet) and again once the config is loaded, which
    replaces the first handler.  ``to_file=False`` stays on stderr (``--check``).  Returns
    the installed filter, if any.  Raises ConfigError when ``logging.file`` cannot be opened.
    """
    from server.logformat import build_handler, install_handler

    install_handler(build_handler(cfg.logging if cfg else None, to_file), level)
    if cfg is None:
        return None
    from server.redact import install

    return install(cfg)


DEMO_CONFIG = """
server: {{host: 127.0.0.1, port: {port}, secret: "{secret}"}}
redis: {{data_dir: "{data_dir}"}}
refresh: {{interval: 60, ahead: 600, max_ttl: 7000, timeout: 10}}
sources:
  access_token:
    url: {sandbox}/cgi-bin/token
    args: {{grant_type: client_credential, appid: {appid}, secret: "{appsecret}"}}
  ticket:
    url: {sandbox}/cgi-bin/ticket/getticket
    args: {{type: jsapi, access_token: <<access_token>>}}
"""


def demo_banner(port: int, secret: str, redis_port: int, sandbox: str, force_min_interval: float = 30.0) -> str:
    base = f"http://127.0.0.1:{port}"
    return f"""
==== wechat-token-server demo (sandbox WeChat at {sandbox}) ====
Request secret (generated for this run): {secret}

  curl -H 'X-Token-Secret: {secret}' '{base}/wechat/token?type=access_token'
  curl -H 'X-Token-Secret: {secret}' '{base}/wechat/token?type=ticket'
  curl '{base}/healthz'
  redis-cli -p {redis_port} GET access_token
  redis-cli -p {redis_port} TTL access_token
  python -c "import redis; print(redis.Redis(port={redis_port}).get('access_token'))"

A forced refresh names the token WeChat rejected (40001/42001) in old=:
  TOKEN=$(curl -s -H 'X-Token-Secret: {secret}' '{base}/wechat/token?type=access_token' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -H 'X-Token-Secret: {secret}' "{base}/wechat/token/forcerefresh?type=access_token&old=$TOKEN"
The answer is a new token when old= is the current one; when someone already replaced it, the
current one, without a call to WeChat.  Without old=, a forced refresh within
refresh.force_min_interval ({force_min_interval:g} s) of the last fetch returns that fetch's token.

Stop with Ctrl-C.
"""


async def run_demo(port: int) -> int:
    import tornado.netutil
    from tornado.httpserver import HTTPServer

    from server.app import Running, serve
    from server.sandbox import Sandbox
    from server.sandbox import make_app as make_sandbox_app

    sandbox = Sandbox()
    appid, appsecret = next(iter(sandbox.apps.items()))
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    sandbox_server = HTTPServer(make_sandbox_app(sandbox))
    sandbox_server.add_sockets(sockets)
    sandbox_url = f"http://127.0.0.1:{sockets[0].getsockname()[1]}"
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="token-server-demo-") as data_dir:
        cfg = parse_config(
            DEMO_CONFIG.format(port=port, secret=secret, data_dir=data_dir, sandbox=sandbox_url, appid=appid, appsecret=appsecret),
            env={},
            source="demo config",
        )
        setup_logging(logging.getLevelName(logging.getLogger().level), cfg)

        def ready(running: Running) -> None:
            redis_port = running.embedded.port if running.embedded else 6379
            print(demo_banner(running.port, secret, redis_port, sandbox_url, cfg.refresh.force_min_interval), flush=True)

        try:
            return await serve(cfg, on_ready=ready)
        finally:
            sandbox_server.stop()


def main(argv: list[str] | None = None) -> int:
    # Until the server's own handler (server.app.serve): a reload asked for while the config
    # is read is not worth dying for, and the file being read is the newest anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = parse_args(argv)
    try:
        check_args(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    if args.demo:
        return run(run_demo(args.port or 12123), args.loop)

    def read(path: str) -> Config:
        cfg = load_config(path)
        if args.port is not None:
            cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, port=args.port))
        return cfg

    try:
        cfg: Config = read(args.config)
        setup_logging(args.log_level, cfg, to_file=not args.check)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.check:
        accounts = f"{len(cfg.accounts)} accounts ({', '.join(cfg.accounts)}), " if cfg.accounts else ""
        print(f"config OK: {accounts}{len(cfg.sources)} sources ({', '.join(cfg.sources)})")
        return 0
    from server.app import serve
    from server.ops.reload import ConfigFile

    config_file = ConfigFile(os.path.abspath(args.config), read)
    if args.workers == 1:
        return run(serve(cfg, config_file=config_file), args.loop)
    return run_workers(args.workers, cfg, config_file, args.loop)


def run_workers(n: int, cfg: Config, config_file: ConfigFile, loop: str) -> int:
    """``--workers N``: bind the port and start the embedded Redis here, once; fork N
    servers on them (server.workers)."""
    from server.app import StartupError, bind, serve
    from server.service import redis_url
    from server.workers import Supervisor

    try:
        sockets = bind(cfg.server.host, cfg.server.port)
        url, embedded = redis_url(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (OSError, StartupError) as e:
        logger.error("cannot start: %s", e)
        return 1
    if embedded is not None:
        # The workers use the Redis started here, also when a reload reads the file again.
        read = config_file.read
        config_file = dataclasses.replace(config_file, read=lambda path: _with_url(read(path), url))
        cfg = _with_url(cfg, url)
    try:
        return Supervisor(n, lambda index: run(serve(cfg, config_file=config_file, sockets=sockets), loop)).run()
    finally:
        for sock in sockets:
            sock.close()
        if embedded is not None:
            embedded.stop()


def _with_url(cfg: Config, url: str | None) -> Config:
    return dataclasses.replace(cfg, redis=dataclasses.replace(cfg.redis, url=url))


def use_loop(choice: str) -> str:
    """Install the event loop ``--loop`` asks for; returns the one in use.  uvloop is not
    adopted by default: bench/bench_reads.py measured 0.97x to 1.24x of asyncio's reads/s
    over three runs on the same machine, no consistent gain."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("--loop uvloop: uvloop is not installed (pip install uvloop), or use --loop asyncio") from None
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


def run(main_coroutine: Coroutine[Any, Any, int], loop: str = "asyncio") -> int:
    """Run the server's coroutine on the chosen event loop; a start that cannot happen is one
    log line and exit 1."""
    from server.app import StartupError

    try:
        logger.info("event loop: %s", use_loop(loop))
        return asyncio.run(main_coroutine)
    except ConfigError as e:  # found only when starting (e.g. redis.data_dir not writable)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (OSError, StartupError) as e:
        logger.error("cannot start: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
