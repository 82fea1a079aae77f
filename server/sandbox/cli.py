"""``python -m server.sandbox``: serve the simulator until SIGTERM; print its URL on stdout."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import tornado.httpserver
import tornado.netutil

from server.sandbox.common import DEFAULT_APPID, DEFAULT_APPSECRET, DEFAULT_CORPID, DEFAULT_CORPSECRET
from server.sandbox.core import Sandbox
from server.sandbox.handlers import MAX_BODY_BYTES, make_app

logger = logging.getLogger(__name__)


def _pair(text: str) -> tuple[str, str]:
    """``APPID:SECRET`` -> (appid, secret); the secret may itself contain colons."""
    appid, sep, secret = text.partition(":")
    if not sep or not appid or not secret:
        raise argparse.ArgumentTypeError(f"expected APPID:SECRET, not {text.split(':')[0]!r}:...")
    return appid, secret


def _corp_app(text: str) -> tuple[str, str, str]:
    """``CORPID:AGENTID:SECRET`` -> (corpid, agentid, secret)."""
    corpid, _, rest = text.partition(":")
    agentid, sep, secret = rest.partition(":")
    if not sep or not corpid or not agentid or not secret:
        # Only the corpid is echoed: the rest may hold the secret.
        raise argparse.ArgumentTypeError(f"expected CORPID:AGENTID:SECRET for corp {corpid!r}")
    return corpid, agentid, secret


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m server.sandbox",
                                     description="Serve the WeChat credential-API simulator.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--expires-in", type=int, default=7200, help="token life, seconds")
    parser.add_argument("--overlap", type=float, default=300.0,
                        help="seconds a superseded token stays valid")
    parser.add_argument("--daily-quota", type=int, default=2000,
                        help="/cgi-bin/token calls per appid per day")
    parser.add_argument("--appid", default=DEFAULT_APPID)
    parser.add_argument("--secret", default=DEFAULT_APPSECRET)
    parser.add_argument("--app", type=_pair, action="append", default=[], metavar="APPID:SECRET",
                        help="another official account or mini program (repeatable)")
    parser.add_argument("--corp-app", type=_corp_app, action="append", default=[],
                        metavar="CORPID:AGENTID:SECRET",
                        help=f"a WeCom app (repeatable); {DEFAULT_CORPID} is always there")
    return parser.parse_args(argv)


async def _serve(sandbox: Sandbox, host: str, port: int) -> int:
    """Serve until SIGTERM or SIGINT; print the URL once listening. Returns the exit status."""
    sockets = tornado.netutil.bind_sockets(port, address=host)
    server = tornado.httpserver.HTTPServer(make_app(sandbox), max_body_size=MAX_BODY_BYTES)
    server.add_sockets(sockets)
    bound_port = sockets[0].getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    # The parent process reads this one line to learn the port; flush or it may wait forever.
    print(f"SANDBOX_URL=http://{url_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logger.info("sandbox on port %s stopping", bound_port)
    server.stop()
    try:
        # A "hang" fault may hold a connection for its whole delay; do not wait on it for long.
        await asyncio.wait_for(server.close_all_connections(), timeout=2.0)
    except asyncio.TimeoutError:
        logger.warning("sandbox: connections still open at exit")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Logs go to stderr: stdout carries only the SANDBOX_URL line.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    corp_apps: dict[str, dict[str, str]] = {}
    for corpid, agentid, secret in args.corp_app:
        corp_apps.setdefault(corpid, {})[agentid] = secret
    sandbox = Sandbox(apps={args.appid: args.secret, **dict(args.app)},
                      corps={DEFAULT_CORPID: DEFAULT_CORPSECRET}, corp_apps=corp_apps,
                      expires_in=args.expires_in, overlap=args.overlap,
                      daily_quota=args.daily_quota)
    return asyncio.run(_serve(sandbox, args.host, args.port))
