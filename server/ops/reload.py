"""Live reload: ``kill -HUP <pid>`` or ``POST /admin/reload`` (the operator's secret only).

The config file is read and validated again (the same checks as ``--check``).  A file
that fails is refused as a whole, one line naming the key and the fix, and the running
config stays in force.  A good one is applied to the running parts in place:

- accounts and sources added: their first fetch now, as at startup (a value another
  instance already stored costs no call);
- removed: no longer refreshed or served at once; a fetch of theirs under way finishes;
  their Redis keys stay (the log says which);
- changed secrets, clients, JWT keys, rate limits, IP rules, JS-SDK domains: from the
  next request; a changed AppSecret is used at the next fetch;
- webhooks (``notify``) added, removed or changed: from the next event;
- unchanged sources: untouched, 0 upstream calls.

What a running process cannot change (the listening address, Redis, ``refresh:``,
``logging:``, ``face:``) is logged as needing a restart; the rest still applies.  A
source whose request now names another account or endpoint under the same name is refused:
its stored value belongs to the old one (give the new one a new name).

Requests in flight finish with the parts they started with; the next one sees the new
config.  Reloads run one at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tornado.web

from server import redact
from server.accounts import Accounts
from server.config import Config, ConfigError, SourceConfig
from server.config_file import load_config
from server.handlers import BaseHandler
from server.jssdk_handler import public_limits
from server.sources import Source

if TYPE_CHECKING:
    from server.service import Service

logger = logging.getLogger(__name__)

#: request arguments that carry a credential, not the identity of what is fetched
_SECRET_ARGS = frozenset({"secret", "corpsecret", "appsecret", "component_appsecret"})
#: config sections a running process keeps until a restart
_RESTART_ONLY = ("redis", "refresh", "logging", "face", "platform")
_SERVER_RESTART_ONLY = ("host", "port", "header_timeout", "shutdown_timeout")


def _identity(src: SourceConfig) -> tuple[Any, ...]:
    def strip(d: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, repr(v)) for k, v in (d or {}).items() if k not in _SECRET_ARGS))

    return (src.url, src.method, src.field, strip(src.args), strip(src.json))


def check_reloadable(old: Config, new: Config) -> list[str]:
    """Raise ConfigError for a change no reload may make; returns the changes that wait
    for a restart (one text per key)."""
    for name in old.sources.keys() & new.sources.keys():
        if _identity(old.sources[name]) != _identity(new.sources[name]):
            raise ConfigError(
                f"sources.{name}: its request now names another account or endpoint; the value stored under this name "
                "belongs to the old one: give the new one another name (or restart after deleting the old keys)"
            )
    platforms = {n for n, a in old.accounts.items() if a.kind == "component"} | {n for n, a in new.accounts.items() if a.kind == "component"}
    for name in sorted(platforms):
        if old.accounts.get(name) != new.accounts.get(name):
            raise ConfigError(f"accounts.{name}: a third-party platform (kind: component) is added, removed or changed by a restart, "
                              "not a reload: its verify ticket and authorizers' schedule are built at start")
    added = {_identity(new.sources[n]): n for n in new.sources.keys() - old.sources.keys()}
    for name in old.sources.keys() - new.sources.keys():
        renamed = added.get(_identity(old.sources[name]))
        if renamed is not None:
            owner = renamed.split(".", 1)[0]
            raise ConfigError(
                f"accounts.{owner}: its source {name} would be renamed {renamed} (a second account makes none the default), "
                f"and readers of the key {name} would lose it: mark it default: true to keep the plain names"
            )
    later = [section for section in _RESTART_ONLY if getattr(old, section) != getattr(new, section)]
    for key in _SERVER_RESTART_ONLY:
        if getattr(old.server, key) != getattr(new.server, key):
            later.append(f"server.{key}")
    if old.face and bool(old.accounts) != bool(new.accounts):
        later.append("accounts (the API proxy is on with accounts, off without)")
    return later


def in_force(old: Config, new: Config) -> Config:
    """``new`` with what a running process keeps until a restart taken from ``old``."""
    kept = {section: getattr(old, section) for section in _RESTART_ONLY}
    server = dataclasses.replace(new.server, **{key: getattr(old.server, key) for key in _SERVER_RESTART_ONLY})
    return dataclasses.replace(new, server=server, **kept)


class Reloader:
    """Reads ``path`` again (through ``read``: the command line's overrides applied) and
    applies it to ``service`` (see the module docstring)."""

    def __init__(self, service: Service, path: str, read: Callable[[str], Config] = load_config) -> None:
        self.service = service
        self.path = path
        self.read = read
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"Reloader({self.path!r})"

    async def reload(self) -> dict[str, Any]:
        """Apply the file now; returns what changed.  Raises ConfigError (one line) when
        the file is refused: nothing changed then."""
        async with self._lock:
            try:
                new = self.read(self.path)
            except ConfigError as e:
                logger.error("reload refused, the running config stays in force: %s", e)
                raise
            try:
                return await apply(self.service, new)
            except ConfigError as e:
                logger.error("reload refused, the running config stays in force: %s", e)
                raise


async def apply(service: Service, new: Config) -> dict[str, Any]:
    """Apply a validated config to the running service; returns the changes."""
    from server.service import owners

    old = service.cfg
    later = check_reloadable(old, new)
    new = in_force(old, new)
    accounts = Accounts.from_config(new)
    redact.extend(new)  # first: the new secrets are masked before anything logs them
    # Accounts, owners and the gate change in one step with no await: the next request sees
    # them all.  Sources follow (reconfigure awaits fetches of removed and added ones).
    service.accounts.replace(accounts)
    service.store.owners = owners(service.accounts)
    service.auth.reconfigure(new)
    _replace_public_limits(service, new)
    sessions = service.sessions
    if sessions is not None and old.server.secret != new.server.secret:
        sessions.rekey(new.server.secret)
    service.calls.quotas = {name: src.daily_quota for name, src in new.sources.items()}
    if service.webhooks is not None:  # the next event is sent to the new hooks (server.ops.webhooks)
        service.webhooks.configure(new)
    service.cfg = new
    sources = {name: Source(src) for name, src in new.sources.items()}
    if service.platforms is not None:
        sources.update(service.platforms.sources())  # the component tokens carry their verify tickets
    # notify (webhooks) is no part of the request: a source whose hooks alone changed is not "changed"
    changed = sorted(n for n in old.sources.keys() & new.sources.keys()
                     if dataclasses.replace(old.sources[n], notify=[]) != dataclasses.replace(new.sources[n], notify=[]))
    for name in changed:
        logger.info("reload: source %s: its request changed (a secret?); used from its next fetch, no call now", name)
    added, removed = await service.refresher.reconfigure(sources)
    for name in removed:
        logger.warning("reload: source %s removed: no longer refreshed or served; its Redis keys (%s...) are left alone",
                       name, service.store.key(name))
    for name in added:
        logger.info("reload: source %s added: %s", name, service.refresher.status().get(name, {}).get("state", "?"))
    for key in later:
        logger.warning("reload: %s changed in the file: takes effect at the next restart", key)
    logger.info("reload done: %d sources added, %d removed, %d changed, %d clients", len(added), len(removed), len(changed), len(new.clients))
    return {"added": added, "removed": removed, "changed": changed, "restart_needed": later}


def _replace_public_limits(service: Service, new: Config) -> None:
    """The per-account JS-SDK limits, in the same dict the handlers hold; an account whose
    rate is unchanged keeps its limit object (and the counts under way)."""
    fresh = public_limits(service.limits_redis, new.redis.prefix, service.accounts)
    current = service.jssdk_limits
    for name in list(current):
        if name not in fresh:
            del current[name]
    for name, limit in fresh.items():
        if name in current:
            current[name].set_rate(service.accounts.by_name[name].jssdk.public_per_minute)
        else:
            current[name] = limit


class ReloadHandler(BaseHandler):
    """``POST /admin/reload`` (operator's secret only): reload the config file.

        curl -X POST -H 'X-Token-Secret: $SECRET' http://127.0.0.1:12123/admin/reload
        200 {"reloaded": true, "added": ["shop.access_token"], "removed": [], "changed": [],
             "restart_needed": []}
        400 {"errcode": 400, "errmsg": "sources.ticket.args.access_token: <<acess_token>> names no source"}
    """

    arguments: frozenset[str] = frozenset()

    def initialize(self, service: Service, **deps: Any) -> None:  # type: ignore[override]
        super().initialize(**deps)
        self.service = service

    async def post(self) -> None:
        if self.principal is None or not self.principal.is_operator:
            who = self.principal.name if self.principal else "-"
            raise tornado.web.HTTPError(403, "client %s may not reload", who, reason="only the operator's secret (server.secret) may reload the config")
        reloader = self.service.reloader
        if reloader is None:
            raise tornado.web.HTTPError(404, reason="this server has no config file to reload")
        try:
            changes = await reloader.reload()
        except ConfigError as e:
            # In the body, not the status line: the key names come from the file.
            self.set_status(400)
            self.finish({"errcode": 400, "errmsg": str(e)})
            return
        self.finish({"reloaded": True, **changes})


@dataclass(frozen=True)
class ConfigFile:
    """Where the running config came from: an absolute ``path`` (a reload reads the same
    file whatever the working directory has become) and ``read``, which applies the command
    line's overrides (``--port``) as at startup."""

    path: str
    read: Callable[[str], Config] = load_config
