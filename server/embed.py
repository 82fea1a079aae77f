"""The token service inside an existing Tornado application (the library face).

The host application keeps its own handlers, port and process; the service adds its
refresher (the same lock, fencing and one upstream call per rotation as the standalone
server and every other instance on the same Redis) and, if wanted, its handlers under a
path prefix::

    from server.embed import TokenService

    tokens = await TokenService.start({          # or a Config, or the path of a YAML file
        "server": {"secret": os.environ["TOKEN_SECRET"]},
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "accounts": {"main": {"appid": "wx...", "secret": os.environ["WECHAT_APPSECRET"]}},
    })
    app = tornado.web.Application(
        [(r"/", HomeHandler), *tokens.handlers("/tokens")],   # /tokens/wechat/token?type=...
        log_function=tokens.log_function,                     # never logs a query's secret
    )
    app.listen(8000)
    token = await tokens.token("access_token")                # in-process, no HTTP
    ...
    await tokens.stop()                                       # at the host's shutdown

Mounted handlers: the API (``/wechat/token``, ``/wechat/token/forcerefresh``,
``/wechat/jssdk/config``, ``/healthz``, ``/readyz``, ``/status``, ``/metrics``) and, with
``face: true``, the face's token and ticket answers (``/cgi-bin/token``...), all under the
prefix, and with a third-party platform (``kind: component``) its routes
(``/wechat/component/events``, ``/wechat/component/authorizers``, ``/wechat/component/status``,
authorizer appids on ``/wechat/token``), also under the prefix: point the platform's event URL
there.  The status page and the API proxy need the standalone server (they own paths at the root).  ``server.host``/``server.port`` are not used: the host application listens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from server.config import Config
from server.config_file import config_from_dict, load_config
from server.face import face_routes
from server.handlers import log_request
from server.ops.reload import Reloader, apply
from server.platform.handlers import platform_routes
from server.service import Service
from server.state import Unavailable

__all__ = ["TokenService", "Unavailable"]


class TokenService:
    """A started service (see the module docstring); build it with :meth:`start`."""

    #: give the host application this as ``log_function``: the access log without query strings
    log_function = staticmethod(log_request)

    def __init__(self, service: Service) -> None:
        self.service = service

    def __repr__(self) -> str:
        return f"TokenService({', '.join(self.service.refresher.sources)})"

    @classmethod
    async def start(cls, config: Config | Mapping[str, Any] | str) -> TokenService:
        """Validate ``config`` (a Config, a dict shaped like the YAML file, or a file path),
        build the parts and run the first refresh pass.  Raises ConfigError (one line) for a
        bad config and StartupError when Redis cannot be used."""
        if isinstance(config, str):
            cfg = load_config(config)
        elif isinstance(config, Config):
            cfg = config
        else:
            cfg = config_from_dict(config, "embedded config")
        service = await Service.open(cfg)
        if isinstance(config, str):  # POST <prefix>/admin/reload reads the file again
            service.reloader = Reloader(service, os.path.abspath(config))
        return cls(service)

    def handlers(self, prefix: str = "") -> list[Any]:
        """The routes to add to the host application, under ``prefix`` ("/tokens", or "")."""
        prefix = prefix.rstrip("/")
        rules = self.service.routes(prefix)
        if self.service.platforms is not None:  # first: they take over /wechat/token for authorizer appids
            rules = platform_routes(self.service.platforms, self.service.deps, prefix) + rules
        if self.service.face is not None:
            face_rules, _, _ = face_routes(self.service.face, self.service.deps)
            rules += [(prefix + pattern, handler, args) for pattern, handler, args in face_rules if not pattern.startswith("/wechat/")]
        return rules

    async def token(self, type_: str = "access_token", account: str | None = None, appid: str | None = None) -> str:
        """The current value of an account's ``type_`` (``access_token``, ``ticket``...), in
        process.  Never calls WeChat; raises Unavailable when there is no valid value and
        LookupFailed / KeyError for an unknown account or type."""
        return (await self.service.refresher.current(self._source(type_, account, appid))).value

    async def refresh_after_rejection(self, value: str, type_: str = "access_token", account: str | None = None,
                                      appid: str | None = None) -> str:
        """WeChat rejected ``value`` (40001/42001): a new value if ``value`` is still the
        current one (one upstream call across every instance), else the current one."""
        name = self._source(type_, account, appid)
        return (await self.service.refresher.refresh(name, force=True, old=value)).value

    async def reload(self, config: Config | Mapping[str, Any]) -> dict[str, Any]:
        """Apply a new config in place (see server.ops.reload); ConfigError leaves the old one."""
        cfg = config if isinstance(config, Config) else config_from_dict(config, "embedded config")
        return await apply(self.service, cfg)

    async def stop(self, timeout: float | None = None) -> None:
        """Finish requests and fetches under way (``timeout`` seconds, default
        ``server.shutdown_timeout``), release locks, close connections."""
        await self.service.drain(self.service.cfg.server.shutdown_timeout if timeout is None else timeout)
        await self.service.close()

    def _source(self, type_: str, account: str | None, appid: str | None) -> str:
        accounts = self.service.accounts
        found = accounts.find(account, appid) if accounts else None
        name = found.source(type_) if found is not None else type_
        if name is None or name not in self.service.refresher.sources:
            raise KeyError(f"no source for type {type_!r}" + (f" of account {found.name}" if found else ""))
        return name
