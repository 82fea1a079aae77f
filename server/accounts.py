"""Accounts: a WeChat account expanded into ordinary sources, and looked up by name or appid.

An account under ``accounts:`` is a shorthand for the sources it needs (its token, and the
tickets it lists), declared exactly as one would by hand under ``sources:``.  Source names:

- the **default** account (the only one, or the one marked ``default: true``) keeps the
  plain names direct Redis readers use today: ``access_token``, ``ticket`` (jsapi),
  ``wx_card_ticket``, ``agent_config_ticket``;
- every other account ``NAME`` gets ``NAME.access_token``, ``NAME.ticket``, and so on.

So a request names a *type* (``access_token``, ``ticket``, ``wx_card_ticket``,
``agent_config_ticket``) and an account (``account=shop`` or ``appid=wx456``; neither: the
default account), or, as before, a source by its full name.

This module builds on :mod:`server.config` (the schema); ``config.validate`` calls
:func:`expand` before it checks the sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from server.config import (
    EXAMPLE_APPIDS,
    PLACEHOLDER_SECRETS,
    AccountConfig,
    Config,
    ConfigError,
    JssdkConfig,
    SourceConfig,
    example_appid_error,
    is_wechat_host,
)

#: Account names become source-name prefixes (``shop.access_token``): no dots.
ACCOUNT_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
KINDS = ("official", "miniprogram", "wecom")
API_BASES = {"official": "https://api.weixin.qq.com", "miniprogram": "https://api.weixin.qq.com", "wecom": "https://qyapi.weixin.qq.com"}
#: ticket kind -> the type (and default source name) it is served as
TICKET_TYPES = {"jsapi": "ticket", "wx_card": "wx_card_ticket", "agent_config": "agent_config_ticket"}
TICKETS_OF = {"official": ("jsapi", "wx_card"), "miniprogram": (), "wecom": ("jsapi", "agent_config")}
TOKEN = "access_token"
#: what a request's ``type`` may name for an account
TYPES = frozenset({TOKEN, *TICKET_TYPES.values()})
#: calls to the token endpoint WeChat allows per day, by kind (WeCom publishes no daily figure)
DAILY_QUOTAS: dict[str, int | None] = {"official": 2000, "miniprogram": 2000, "wecom": None}


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Account:
    """One configured account, as the HTTP faces need it (no secret: its digest only).

    ``appid`` is the appid, or the corpid of a WeCom app; ``sources`` maps each type this
    account serves (``access_token``, ``ticket``...) to its source name.
    """

    name: str
    kind: str
    appid: str
    agentid: int | None
    api_base: str
    sources: dict[str, str]
    default: bool
    jssdk: JssdkConfig
    secret_digest: bytes = field(repr=False)

    def source(self, type_: str) -> str | None:
        return self.sources.get(type_)

    def secret_matches(self, presented: str) -> bool:
        """Constant-time comparison with the account's own AppSecret (or corpsecret)."""
        return hmac.compare_digest(_digest(presented), self.secret_digest)


class LookupFailed(Exception):
    """The account a request names does not exist; ``str()`` is safe to show (no value echoed)."""


class Accounts:
    """The configured accounts, by name and by appid (see the module docstring)."""

    def __init__(self, accounts: Iterable[Account]) -> None:
        self._index(accounts)

    def replace(self, other: Accounts) -> None:
        """Take ``other``'s accounts (a reload): every holder of this object sees them."""
        self._index(other.by_name.values())

    def _index(self, accounts: Iterable[Account]) -> None:
        self.by_name = {a.name: a for a in accounts}
        self.default = next((a for a in self.by_name.values() if a.default), None)
        by_appid: dict[str, list[Account]] = {}
        for a in self.by_name.values():
            by_appid.setdefault(a.appid, []).append(a)
        # A corpid shared by several WeCom apps names none of them.
        self.by_appid = {appid: found[0] for appid, found in by_appid.items() if len(found) == 1}
        self._owners = {source: a for a in self.by_name.values() for source in a.sources.values()}

    @classmethod
    def from_config(cls, cfg: Config) -> Accounts:
        return cls(_account(name, acc) for name, acc in cfg.accounts.items())

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def __repr__(self) -> str:
        return f"Accounts({', '.join(self.by_name)})"

    def find(self, account: str | None, appid: str | None) -> Account | None:
        """The account named by ``account`` or ``appid`` (both: they must agree); the default
        account when neither is given (None if there is none).  Raises LookupFailed."""
        found = None
        if account is not None:
            found = self.by_name.get(account)
            if found is None:
                raise LookupFailed("unknown account")
        if appid is not None:
            by_appid = self.by_appid.get(appid)
            if by_appid is None:
                raise LookupFailed("unknown appid")
            if found is not None and found is not by_appid:
                raise LookupFailed("account and appid name different accounts")
            found = by_appid
        return found if found is not None else self.default

    def owner(self, source: str) -> Account | None:
        """The account a source belongs to (None for a source declared by hand)."""
        return self._owners.get(source)


def source_name(account: str, type_: str, default: bool) -> str:
    return type_ if default else f"{account}.{type_}"


def _account(name: str, acc: AccountConfig) -> Account:
    default = acc.default
    sources = {TOKEN: source_name(name, TOKEN, default)}
    for ticket in acc.tickets:
        sources[TICKET_TYPES[ticket]] = source_name(name, TICKET_TYPES[ticket], default)
    wecom = acc.kind == "wecom"
    return Account(
        name=name,
        kind=acc.kind,
        appid=acc.corpid if wecom else acc.appid,
        agentid=acc.agentid,
        api_base=(acc.api_base or API_BASES[acc.kind]).rstrip("/"),
        sources=sources,
        default=default,
        jssdk=acc.jssdk,
        secret_digest=_digest(acc.corpsecret if wecom else acc.secret),
    )


# --- expansion into sources ------------------------------------------------------------------


def _sources_of(name: str, acc: AccountConfig) -> dict[str, SourceConfig]:
    """The sources an account declares (see the module docstring for their names)."""
    base = (acc.api_base or API_BASES[acc.kind]).rstrip("/")
    token = source_name(name, TOKEN, acc.default)
    # The quota is the token's: tickets are counted too, but WeChat publishes no daily figure for them.
    quota = acc.daily_quota if acc.daily_quota is not None else DAILY_QUOTAS[acc.kind]
    out: dict[str, SourceConfig] = {}
    if acc.kind == "wecom":
        out[token] = SourceConfig(url=f"{base}/cgi-bin/gettoken", args={"corpid": acc.corpid, "corpsecret": acc.corpsecret}, daily_quota=quota)
    elif acc.token == "stable":
        out[token] = SourceConfig(
            url=f"{base}/cgi-bin/stable_token",
            method="POST",
            json={"grant_type": "client_credential", "appid": acc.appid, "secret": acc.secret, "force_refresh": False},
            force={"force_refresh": True},
            daily_quota=quota,
        )
    else:
        out[token] = SourceConfig(
            url=f"{base}/cgi-bin/token", args={"grant_type": "client_credential", "appid": acc.appid, "secret": acc.secret}, daily_quota=quota
        )
    use = f"<<{token}>>"
    for ticket in acc.tickets:
        target = source_name(name, TICKET_TYPES[ticket], acc.default)
        if acc.kind == "wecom" and ticket == "jsapi":
            out[target] = SourceConfig(url=f"{base}/cgi-bin/get_jsapi_ticket", args={"access_token": use}, field="ticket")
        elif acc.kind == "wecom":
            out[target] = SourceConfig(url=f"{base}/cgi-bin/ticket/get", args={"access_token": use, "type": "agent_config"}, field="ticket")
        else:
            out[target] = SourceConfig(url=f"{base}/cgi-bin/ticket/getticket", args={"access_token": use, "type": ticket}, field="ticket")
    return out


def _check_wechat_secret(path: str, secret: str) -> None:
    """WeChat hands out the secret (an AppSecret has 32 characters, a WeCom secret 43): refuse
    what is obviously an example, never asked of WeChat and blocked at the first call."""
    if secret.strip().lower() in PLACEHOLDER_SECRETS or re.search(r"change.?me|your.?secret", secret, re.I) or len(secret) < 16:
        raise ConfigError(f"{path}: does not look like a secret WeChat issued; put the real one in an environment variable, e.g. ${{MAIN_APPSECRET}}")


def _check_id(path: str, value: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ConfigError(f"{path}: {value[:40]!r} is no appid or corpid (letters and digits, as the WeChat console shows it)")


def _check(name: str, acc: AccountConfig) -> None:
    path = f"accounts.{name}"
    if not ACCOUNT_NAME_RE.match(name):
        raise ConfigError(f"{path}: an account name is letters, digits, _ - (at most 32), starting with a letter")
    if acc.kind not in KINDS:
        raise ConfigError(f"{path}.kind: {acc.kind!r} is no kind; use one of {', '.join(KINDS)}")
    wecom = acc.kind == "wecom"
    id_key, secret_key = ("corpid", "corpsecret") if wecom else ("appid", "secret")
    article = "an" if acc.kind[0] in "aeiou" else "a"
    for key in (id_key, secret_key):
        if not getattr(acc, key):
            raise ConfigError(f"{path}.{key}: missing; {article} {acc.kind} account needs {id_key} and {secret_key}")
    _check_wechat_secret(f"{path}.{secret_key}", getattr(acc, secret_key))
    _check_id(f"{path}.{id_key}", getattr(acc, id_key))
    if getattr(acc, id_key) in EXAMPLE_APPIDS and is_wechat_host(acc.api_base or API_BASES[acc.kind]):
        raise example_appid_error(f"{path}.{id_key}", getattr(acc, id_key))
    if wecom and (acc.appid or acc.secret):
        raise ConfigError(f"{path}: a wecom account takes corpid and corpsecret, not appid and secret")
    if not wecom:
        if acc.corpid or acc.corpsecret or acc.agentid is not None:
            raise ConfigError(f"{path}: corpid, corpsecret and agentid are for kind: wecom")
        if acc.token not in ("stable", "classic"):
            raise ConfigError(f"{path}.token: {acc.token!r}; use stable (POST /cgi-bin/stable_token) or classic (GET /cgi-bin/token)")
    for i, ticket in enumerate(acc.tickets):
        if ticket not in TICKET_TYPES:
            raise ConfigError(f"{path}.tickets[{i}]: {ticket!r} is no ticket type; use {', '.join(TICKET_TYPES)}")
        if ticket not in TICKETS_OF[acc.kind]:
            have = ", ".join(TICKETS_OF[acc.kind]) or "none"
            raise ConfigError(f"{path}.tickets[{i}]: {article} {acc.kind} account has no {ticket} ticket (it has: {have})")
    if len(set(acc.tickets)) != len(acc.tickets):
        raise ConfigError(f"{path}.tickets: list each ticket once")
    if "agent_config" in acc.tickets and acc.agentid is None:
        raise ConfigError(f"{path}.agentid: the agent_config ticket needs the app's agentid")
    if acc.api_base and not re.fullmatch(r"https?://[^\s/]+/?", acc.api_base):
        raise ConfigError(f"{path}.api_base: an origin like https://api.weixin.qq.com (no path)")
    for i, domain in enumerate(acc.jssdk.allowed_domains):
        found = re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:(\d{1,5}))?", domain)
        if not found or (found[4] is not None and not 0 < int(found[4]) <= 65535):
            raise ConfigError(f"{path}.jssdk.allowed_domains[{i}]: {domain!r}; a host like shop.example.com or *.example.com")
        # "*.com" would let every .com site sign as this account: a wildcard needs a registrable name.
        if domain.startswith("*.") and "." not in domain[2:].partition(":")[0]:
            raise ConfigError(f"{path}.jssdk.allowed_domains[{i}]: {domain!r}; a wildcard covers the subdomains of a name like *.example.com")
    if acc.jssdk.public and not acc.jssdk.allowed_domains:
        raise ConfigError(f"{path}.jssdk.public: needs jssdk.allowed_domains (the only pages a browser may sign)")
    if acc.daily_quota is not None and acc.daily_quota < 1:
        raise ConfigError(f"{path}.daily_quota: at least 1 (WeChat's is 2000 for an official account or a mini program)")
    if acc.jssdk.public_per_minute < 1:
        raise ConfigError(f"{path}.jssdk.public_per_minute: at least 1 (a public signer must be rate-limited, not shut)")


def expand(cfg: Config) -> Config:
    """The config with every account's sources added to ``sources`` and every client's
    ``accounts`` added to its ``sources``.  Raises ConfigError (one line) for a bad account."""
    if not cfg.accounts:
        for i, client in enumerate(cfg.clients):
            if client.accounts:
                raise ConfigError(f"clients[{i}].accounts: no accounts are configured; list sources instead")
        return cfg
    defaults = [n for n, a in cfg.accounts.items() if a.default]
    if len(defaults) > 1:
        raise ConfigError(f"accounts.{defaults[1]}.default: only one account can be the default (also: {defaults[0]})")
    only = len(cfg.accounts) == 1
    accounts: dict[str, AccountConfig] = {}
    seen_ids: dict[Any, str] = {}
    sources = dict(cfg.sources)
    for name, acc in cfg.accounts.items():
        acc = dataclasses.replace(acc, name=name, default=acc.default or only)
        _check(name, acc)
        key: Any = (acc.corpid, acc.agentid) if acc.kind == "wecom" else acc.appid
        if key in seen_ids:
            raise ConfigError(f"accounts.{name}: same {'corpid and agentid' if acc.kind == 'wecom' else 'appid'} as accounts.{seen_ids[key]}; each account once")
        seen_ids[key] = name
        if acc.kind == "wecom" and "jsapi" in acc.tickets:
            # The corp's jsapi ticket is one per corp: two apps keeping it would fetch it twice
            # against the corp's hourly limit.
            if ("jsapi", acc.corpid) in seen_ids:
                raise ConfigError(f"accounts.{name}.tickets: corp {acc.corpid}'s jsapi ticket is already kept by accounts.{seen_ids['jsapi', acc.corpid]}; list jsapi on one of its apps")
            seen_ids["jsapi", acc.corpid] = name
        for source, declared in _sources_of(name, acc).items():
            if source in sources:
                raise ConfigError(f"accounts.{name}: its source {source} is also declared under sources:; remove one")
            sources[source] = declared
        accounts[name] = acc
    clients = []
    for i, client in enumerate(cfg.clients):
        extra = []
        for account in client.accounts:
            if account not in accounts:
                raise ConfigError(f"clients[{i}].accounts: {account!r} is no account (known: {', '.join(accounts)})")
            extra += [s for s in _sources_of(account, accounts[account]) if s not in client.sources and s not in extra]
        clients.append(dataclasses.replace(client, sources=[*client.sources, *extra]))
    return dataclasses.replace(cfg, accounts=accounts, sources=sources, clients=clients)
