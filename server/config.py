"""The YAML configuration: every key declared once, with its type, default and help.

Each section is a frozen dataclass.  A field's type is the schema, its default is the
default, and ``metadata["help"]`` is the text shown in errors and in the README's
reference.  :func:`validate` checks the rules that span keys (dependencies between
sources, placeholder secrets, refresh timings).  Any problem raises :class:`ConfigError`
whose message is one line: ``the.key.path: what is wrong; what to do``.

Reading a file (YAML, ``${ENV_VAR}`` expansion, conversion against these dataclasses,
accounts expanded into sources) is :mod:`server.config_file`'s.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: ``<<name>>`` in an arg or json value is replaced by the current value of source ``name``.
TEMPLATE_RE = re.compile(r"<<\s*([^<>\s]*)\s*>>")
#: Source names become Redis keys and query values: keep them boring.
SOURCE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
#: Client names appear in every access log line: the same boring alphabet.
CLIENT_NAME_RE = SOURCE_NAME_RE

#: Request secrets that are obviously examples.  Compared case-insensitively.
PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me", "changeme", "change_me", "secret", "password", "passwd", "123456",
        "12345678", "your-secret", "your_secret", "yoursecret", "xxx", "xxxx", "test",
        "example", "token", "admin", "default", "replace-me", "todo",
    }
)
MIN_SECRET_LENGTH = 16
#: The appids and corpid the README and config.example.yaml show.  Harmless against the sandbox
#: (whose first app is wx123), but sent to WeChat's real host they only earn 40013 at the first
#: call: --check says so before the server starts.
EXAMPLE_APPIDS = frozenset({"wx123", "wx456", "wx789", "ww789"})
#: WeChat's own API hosts (api.weixin.qq.com, qyapi.weixin.qq.com, regional ones such as
#: sh.api.weixin.qq.com, api.wechat.com): the placeholder checks apply to these only.
WECHAT_HOST_RE = re.compile(r"(^|\.)(weixin\.qq\.com|wechat\.com)$", re.I)
#: Log levels --log-level (or LOG_LEVEL) accepts.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(Exception):
    """A config problem, as one line naming the key and the fix."""


def opt(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, secret: bool = False) -> Any:
    """Declare a config key: its default (or ``factory`` for a mutable one) and its help.

    ``secret=True`` keeps the value out of the dataclass's repr.
    """
    if factory is not None:
        return field(default_factory=factory, repr=not secret, metadata={"help": help})
    return field(default=default, repr=not secret, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    host: str = opt("127.0.0.1", "address the HTTP server binds; keep 127.0.0.1 behind nginx")
    port: int = opt(12123, "TCP port of the HTTP server")
    secret: str = opt("", "request secret clients present (at least 16 characters; use ${ENV_VAR})", secret=True)
    allow_ips: list[str] = opt(help="client IPs or CIDR ranges allowed to call (empty: any)", factory=list)
    trusted_proxies: list[str] = opt(
        help="peers (IPs/CIDRs) whose X-Real-IP / X-Forwarded-For are believed", factory=lambda: ["127.0.0.1", "::1"]
    )
    probe_ips: list[str] = opt(
        help="peers (IPs/CIDRs) outside allow_ips that may still connect, for /healthz and /readyz only (a load balancer's checker)",
        factory=list,
    )
    header_timeout: float = opt(10.0, "seconds a connection gets to send a request's headers (also the keep-alive idle limit)")
    auth_failures_per_minute: int = opt(10, "failed authentications allowed per client IP per minute before 429")
    forcerefresh_per_minute: int = opt(60, "forced refreshes allowed per client per minute before 429")
    shutdown_timeout: float = opt(10.0, "seconds to let in-flight requests and fetches finish on SIGTERM")


@dataclass(frozen=True)
class SentinelConfig:
    hosts: list[str] = opt(help='sentinels as "host:port"', factory=list)
    service_name: str = opt("mymaster", "the monitored primary's name")
    password: str | None = opt(None, "password of the Redis primary and replicas", secret=True)
    sentinel_password: str | None = opt(None, "password of the sentinels themselves", secret=True)


@dataclass(frozen=True)
class RedisConfig:
    url: str | None = opt(None, "redis:// or rediss:// URL; leave out to start an embedded redis-server", secret=True)
    prefix: str = opt("", 'key prefix; "" keeps the plain keys access_token, ticket')
    password: str | None = opt(None, "Redis password (or put it in the URL)", secret=True)
    data_dir: str = opt("./data", "embedded Redis: directory of its append-only file")
    port: int = opt(0, "embedded Redis: port on 127.0.0.1 (0 picks a free one)")
    socket_timeout: float = opt(2.0, "seconds before a Redis command counts as failed")
    sentinel: SentinelConfig | None = opt(None, "use Redis Sentinel instead of url")
    cluster: bool = opt(False, "redis.url names one node of a Redis Cluster (any master or replica); the others are discovered from it")


@dataclass(frozen=True)
class RefreshConfig:
    interval: float = opt(60.0, "seconds between refresher ticks")
    ahead: float = opt(600.0, "refresh a value when fewer than this many seconds of life remain")
    max_ttl: float = opt(7000.0, "never keep a value longer than this many seconds, whatever expires_in says")
    timeout: float = opt(10.0, "seconds for one upstream request")
    force_min_interval: float = opt(30.0, "seconds after a fetch during which a forced refresh returns that value")
    backoff_max: float = opt(300.0, "seconds: cap of the exponential backoff after failed fetches")
    read_max_age: float = opt(1.0, "seconds a value served from memory may go without Redis confirming it: rotations by other instances arrive at once through the events channel, this bounds a lost message; 0: every read asks Redis")
    overlap: float = opt(300.0, "seconds WeChat keeps the previous token valid after issuing a new one: a stored token whose successor may have been issued (a lost answer) lives no longer than this; WeChat's is 300, change it only for a simulator")


@dataclass(frozen=True)
class NotifyConfig:
    """One webhook (server.ops.webhooks): every event of the sources it is declared on."""

    url: str = opt(help="where each event is POSTed: an http:// or https:// URL (include_value needs https://, or a receiver on this host)")
    secret: str = opt(help="HMAC-SHA256 key of the X-Signature header (at least 16 characters; use ${ENV_VAR})", secret=True)
    include_value: bool = opt(False, "add the new value itself to rotated events (a risk: the receiver then holds the token; README, Webhooks)")


@dataclass(frozen=True)
class SourceConfig:
    url: str = opt(help="upstream URL, http:// or https://")
    method: str = opt("GET", "GET sends args as the query; POST sends json as the body")
    args: dict[str, Any] = opt(help="query arguments; <<name>> is replaced by source name's value", factory=dict, secret=True)
    json: dict[str, Any] | None = opt(None, "POST body, templated like args", secret=True)
    field: str | None = opt(None, "response field holding the value (default: access_token if present, else ticket)")
    force: dict[str, Any] = opt(help="merged into args/json on a forced refresh, e.g. {force_refresh: true}", factory=dict, secret=True)
    daily_quota: int | None = opt(None, "calls WeChat allows this source per day (China time): a warning is logged at 80%; none: counted, no warning")
    notify: list[NotifyConfig] = opt(help="webhooks told of every event of this source: [{url, secret, include_value}]", factory=list)
    name: str = opt("", "set from the mapping key")


@dataclass(frozen=True)
class JssdkConfig:
    allowed_domains: list[str] = opt(help="hosts whose pages may be signed: shop.example.com, or *.example.com for its subdomains", factory=list)
    public: bool = opt(False, "browsers on allowed_domains may ask for a signature without a secret (CORS for exactly those origins)")
    public_per_minute: int = opt(120, "public mode: signatures per client IP (IPv6: per /64) per minute before 429, across instances")


@dataclass(frozen=True)
class AccountConfig:
    kind: str = opt("official", "official (default), miniprogram or wecom")
    appid: str = opt("", "the appid (official, miniprogram)")
    secret: str = opt("", "its AppSecret (official, miniprogram)", secret=True)
    corpid: str = opt("", "the corpid (wecom)")
    corpsecret: str = opt("", "the app's secret (wecom)", secret=True)
    agentid: int | None = opt(None, "the app's agentid (wecom; needed for the agent_config ticket)")
    token: str = opt("stable", "stable (default): POST /cgi-bin/stable_token; classic: GET /cgi-bin/token (official, miniprogram)")
    tickets: list[str] = opt(help="tickets to keep: jsapi, wx_card (official); jsapi, agent_config (wecom); none for miniprogram", factory=list)
    api_base: str = opt("", "WeChat's API origin: https://api.weixin.qq.com by default, https://qyapi.weixin.qq.com for wecom")
    default: bool = opt(False, "answers requests that name no account (implied when there is one account)")
    daily_quota: int | None = opt(None, "calls to the token endpoint WeChat allows per day (China time): 2000 for official and miniprogram, none for wecom; a warning is logged at 80%")
    jssdk: JssdkConfig = opt(help="JS-SDK signatures for this account's web pages", factory=JssdkConfig)
    notify: list[NotifyConfig] = opt(help="webhooks told of every event of this account's sources: [{url, secret, include_value}]", factory=list)
    # --- kind: component (a third-party platform, server.platform) ---
    msg_token: str = opt("", "component: the message-verification Token of the platform's settings (not token: stable|classic)", secret=True)
    aes_key: str = opt("", "component: the EncodingAESKey, 43 characters", secret=True)
    previous_aes_key: str = opt("", "component: the EncodingAESKey before the last change, still accepted", secret=True)
    name: str = opt("", "set from the mapping key")


@dataclass(frozen=True)
class PlatformConfig:
    """Authorizers of third-party platforms (server.platform): how the shared schedule is worked."""

    tick: float = opt(1.0, "seconds between two looks at the schedule of due authorizers")
    batch: int = opt(100, "authorizers one instance claims at most per look")
    concurrency: int = opt(20, "authorizer refreshes one instance runs at once")
    lease: float = opt(60.0, "seconds a claimed authorizer is this instance's before another may take it")
    replay_window: float = opt(300.0, "seconds an event's timestamp may differ from Redis's clock")


@dataclass(frozen=True)
class ClientConfig:
    name: str = opt(help="client name shown in logs")
    secret: str = opt(help="this client's request secret (at least 16 characters)", secret=True)
    sources: list[str] = opt(help="sources this client may read and force-refresh", factory=list)
    accounts: list[str] = opt(help="accounts whose sources this client may read and force-refresh", factory=list)
    metrics: bool = opt(False, "may read /metrics (every source's state and counts); the server.secret holder always may")


@dataclass(frozen=True)
class JwtConfig:
    keys: dict[str, str] = opt(help="HS256 keys by kid (at least 32 characters each)", factory=dict, secret=True)
    audience: str = opt("wechat-token-server", "required aud claim")
    leeway: float = opt(30.0, "seconds of clock skew tolerated on exp/nbf")


@dataclass(frozen=True)
class LoggingConfig:
    format: str = opt("text", "text (one human line a record) or json (one JSON object a line, for log shippers)")
    file: str | None = opt(None, "write the log to this file instead of stderr; reopened when logrotate moves it")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = opt(help="HTTP server", factory=ServerConfig)
    redis: RedisConfig = opt(help="Redis connection", factory=RedisConfig)
    refresh: RefreshConfig = opt(help="refresher timing", factory=RefreshConfig)
    accounts: dict[str, AccountConfig] = opt(help="WeChat accounts, each a shorthand for its sources (see README, Accounts)", factory=dict)
    sources: dict[str, SourceConfig] = opt(help="credential sources, fetched in dependency order", factory=dict)
    clients: list[ClientConfig] = opt(help="named clients with their own secrets and sources", factory=list)
    jwt: JwtConfig | None = opt(None, "accept HS256 JWTs as Authorization: Bearer")
    face: bool = opt(True, "serve the WeChat-shaped face (/cgi-bin/...) so SDKs can use this server as their API host")
    logging: LoggingConfig = opt(help="log format and destination (the level is --log-level)", factory=LoggingConfig)
    platform: PlatformConfig = opt(help="third-party platforms' authorizers: schedule and events", factory=PlatformConfig)


# --- rules that span keys ------------------------------------------------------------------


def template_names(value: Any) -> list[str]:
    """Every ``<<name>>`` referenced in a (nested) arg or json value, in order."""
    if isinstance(value, str):
        return TEMPLATE_RE.findall(value)
    if isinstance(value, Mapping):
        return [n for v in value.values() for n in template_names(v)]
    if isinstance(value, list):
        return [n for v in value for n in template_names(v)]
    return []


def dependency_order(sources: Mapping[str, SourceConfig]) -> list[str]:
    """Source names so that each comes after the sources its templates name.

    Raises ConfigError for a name that is no source and for a cycle.
    """
    deps: dict[str, list[str]] = {}
    for name, src in sources.items():
        deps[name] = []
        for part in ("args", "json", "force"):
            for ref in template_names(getattr(src, part)):
                if ref not in sources:
                    raise ConfigError(
                        f"sources.{name}.{part}: <<{ref}>> names no source (known: {', '.join(sources)})"
                    )
                if ref not in deps[name]:
                    deps[name].append(ref)
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = trail[trail.index(name):] + [name]
            raise ConfigError(f"sources.{cycle[0]}: dependency cycle {' -> '.join(cycle)}; remove one <<name>>")
        state[name] = "visiting"
        for dep in deps[name]:
            visit(dep, trail + [name])
        state[name] = "done"
        order.append(name)

    for name in sources:
        visit(name, [])
    return order


def check_secret(path: str, secret: str, env: str = "TOKEN_SERVER_SECRET") -> None:
    """A secret we generate (not one WeChat issues): long, random, not an example.  ``env``
    names the environment variable the error suggests."""
    if not secret:
        raise ConfigError(f"{path}: empty; set a random secret of at least {MIN_SECRET_LENGTH} characters, e.g. ${{{env}}}")
    if secret.strip().lower() in PLACEHOLDER_SECRETS or re.search(r"change.?me|your.?secret", secret, re.I):
        raise ConfigError(f"{path}: is a placeholder; generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{path}: shorter than {MIN_SECRET_LENGTH} characters; use a longer random secret")


def check_port(path: str, port: int) -> None:
    """One rule for every port a user gives (``server.port`` and ``--port``): the kernel
    would take 99999 modulo 65536 and listen somewhere nobody looks."""
    if not 0 < port < 65536:
        raise ConfigError(f"{path}: must be between 1 and 65535, got {port}")


def check_log_level(path: str, level: str) -> str:
    """``level`` upper-cased; ConfigError for a name logging would silently take as INFO."""
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"{path}: {level[:20]!r} is no log level; use {', '.join(LOG_LEVELS)}")
    return level.upper()


def is_wechat_host(url: str) -> bool:
    """Whether ``url`` points at WeChat itself (not the sandbox or a simulator)."""
    try:
        host = urllib.parse.urlsplit(url).hostname or ""
    except ValueError:
        return False
    return bool(WECHAT_HOST_RE.search(host))


def example_appid_error(path: str, appid: str) -> ConfigError:
    return ConfigError(
        f"{path}: {appid} is the documentation's example; put your account's own id (an appid is wx and 16 characters, "
        "at mp.weixin.qq.com > Settings and Development > Basic Configuration; a corpid is at work.weixin.qq.com > My Company)"
    )


def is_placeholder(value: str) -> bool:
    """An obvious stand-in for a secret: ``...`` (the README's ``export WECHAT_APPSECRET=...``),
    ``***``, ``change-me``, ``your-secret``, ``APPSECRET`` and the words of PLACEHOLDER_SECRETS."""
    v = value.strip()
    return (
        v.lower() in PLACEHOLDER_SECRETS
        or bool(re.fullmatch(r"[.*?_<>-]*|<?(app|corp)?_?secret>?", v, re.I))
        or bool(re.search(r"change.?me|your.?(app)?secret", v, re.I))
    )


def _check_wechat_placeholders(name: str, src: SourceConfig) -> None:
    """The README's placeholders sent to WeChat's real host (see EXAMPLE_APPIDS)."""
    if not is_wechat_host(src.url):
        return
    for part in ("args", "json"):
        values = getattr(src, part) or {}
        for key in ("appid", "corpid"):
            if values.get(key) in EXAMPLE_APPIDS:
                raise example_appid_error(f"sources.{name}.{part}.{key}", values[key])
        for key in ("secret", "corpsecret", "appsecret"):
            if isinstance(values.get(key), str) and is_placeholder(values[key]):
                raise ConfigError(
                    f"sources.{name}.{part}.{key}: a placeholder, not the secret WeChat issued; "
                    "export the real AppSecret (e.g. WECHAT_APPSECRET) from mp.weixin.qq.com > Settings and Development > Basic Configuration"
                )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_hooks(path: str, hooks: list[NotifyConfig], taken: Mapping[str, str]) -> None:
    """The webhooks under ``path`` (``accounts.NAME.notify``, ``sources.NAME.notify``).
    ``taken``: the request secrets by key; a receiver holding one could call this server."""
    urls: set[str] = set()
    for i, hook in enumerate(hooks):
        at = f"{path}[{i}]"
        try:
            parts = urllib.parse.urlsplit(hook.url.strip())
            host, _ = parts.hostname, parts.port  # .port raises ValueError for a bad one
        except ValueError:
            host, parts = None, None
        if parts is None or parts.scheme not in ("http", "https") or not host or any(c.isspace() for c in hook.url.strip()):
            raise ConfigError(f"{at}.url: must be an http:// or https:// URL, e.g. https://hooks.example.com/wechat-token")
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{at}.url: no user:password@ in a webhook URL; the receiver checks X-Signature instead")
        if hook.url in urls:
            raise ConfigError(f"{at}.url: listed twice; list each webhook once")
        urls.add(hook.url)
        if hook.include_value and parts.scheme != "https" and not _is_loopback(host):
            raise ConfigError(f"{at}.include_value: would send the token in clear over http://; use an https:// URL (or drop include_value)")
        check_secret(f"{at}.secret", hook.secret, "HOOK_SECRET")
        if hook.secret in taken:
            raise ConfigError(f"{at}.secret: same as {taken[hook.secret]}; a receiver must never hold a request secret: give the webhook its own")


def _check_networks(path: str, values: list[str]) -> None:
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ConfigError(f"{path}[{i}]: {v!r} is not an IP address or CIDR range (e.g. 10.0.0.0/8)") from None


def validate(cfg: Config) -> Config:
    """Check the rules that span keys; return the config with sources in dependency order.

    Accounts must have been expanded into sources first (:func:`server.accounts.expand`;
    :mod:`server.config_file` does both)."""
    check_secret("server.secret", cfg.server.secret)
    check_port("server.port", cfg.server.port)
    if cfg.logging.format not in ("text", "json"):
        raise ConfigError(f"logging.format: {cfg.logging.format[:20]!r}; use text or json")
    if cfg.logging.file is not None and not cfg.logging.file.strip():
        raise ConfigError("logging.file: empty; give a path such as /var/log/wechat-token-server/server.log, or leave it out for stderr")
    _check_networks("server.allow_ips", cfg.server.allow_ips)
    _check_networks("server.trusted_proxies", cfg.server.trusted_proxies)
    _check_networks("server.probe_ips", cfg.server.probe_ips)
    if not cfg.server.header_timeout > 0:
        raise ConfigError("server.header_timeout: must be a positive number of seconds")
    for key in ("auth_failures_per_minute", "forcerefresh_per_minute"):
        if getattr(cfg.server, key) < 1:
            raise ConfigError(f"server.{key}: must be at least 1")
    if cfg.server.shutdown_timeout < 0:
        raise ConfigError("server.shutdown_timeout: must be a non-negative number of seconds")
    if not cfg.server.allow_ips and not _is_loopback(cfg.server.host):
        logger.warning(
            "server.host %s accepts connections from other machines and server.allow_ips is empty; "
            "bind 127.0.0.1 behind a TLS proxy, or list the business servers in allow_ips",
            cfg.server.host,
        )
    r = cfg.refresh
    for key in ("interval", "ahead", "max_ttl", "timeout", "backoff_max", "overlap"):
        if getattr(r, key) <= 0:
            raise ConfigError(f"refresh.{key}: must be a positive number of seconds")
    if r.force_min_interval < 0:
        raise ConfigError("refresh.force_min_interval: must be 0 or more seconds")
    if not 0 <= r.read_max_age <= 10:
        raise ConfigError("refresh.read_max_age: must be between 0 and 10 seconds (1 by default)")
    if cfg.redis.socket_timeout <= 0:
        raise ConfigError("redis.socket_timeout: must be a positive number of seconds")
    if r.ahead <= r.interval:
        raise ConfigError(
            f"refresh.ahead: {r.ahead:g} must be greater than refresh.interval ({r.interval:g}), "
            "or a value can expire between two ticks"
        )
    if r.ahead >= r.max_ttl:
        raise ConfigError(f"refresh.ahead: {r.ahead:g} must be less than refresh.max_ttl ({r.max_ttl:g})")
    if cfg.redis.url is not None and cfg.redis.sentinel is not None:
        raise ConfigError("redis.sentinel: give either redis.url or redis.sentinel, not both")
    if cfg.redis.url is not None and not re.match(r"^(redis|rediss|unix)://", cfg.redis.url):
        raise ConfigError("redis.url: must start with redis://, rediss:// or unix://")
    if cfg.redis.cluster:
        if cfg.redis.sentinel is not None:
            raise ConfigError("redis.cluster: a Redis Cluster fails over by itself; give redis.url (one of its nodes) and no redis.sentinel")
        if cfg.redis.url is None:
            raise ConfigError("redis.cluster: needs redis.url, the redis:// or rediss:// URL of one of the cluster's nodes (the embedded Redis is no cluster)")
        if cfg.redis.url.startswith("unix://"):
            raise ConfigError("redis.url: a Redis Cluster is reached over TCP; use redis:// or rediss://host:port of one of its nodes")
        if urllib.parse.urlsplit(cfg.redis.url).path.strip("/") not in ("", "0"):
            raise ConfigError("redis.url: a Redis Cluster has only database 0; drop the /N from the URL")
        # A brace in a key is a hash tag to a cluster (server.store.Keys): a stray one would
        # put a source's keys in different slots.
        start = cfg.redis.prefix.find("{")
        tagged = start >= 0 and cfg.redis.prefix.find("}", start + 1) > start + 1
        if ("{" in cfg.redis.prefix or "}" in cfg.redis.prefix) and not tagged:
            raise ConfigError("redis.prefix: on a Redis Cluster a brace starts a hash tag; use no braces, or one whole tag such as {wechat}:")
        platforms = [name for name, acc in cfg.accounts.items() if acc.kind == "component"]
        if platforms:
            # Its scripts touch an authorizer's keys and the shared schedule at once: different
            # slots.  Not built for a cluster yet (README, Redis Cluster).
            raise ConfigError(f"accounts.{platforms[0]}: a third-party platform (kind: component) needs a single Redis "
                              "(with Sentinel if you like), not redis.cluster: its schedule and authorizers share scripts")
    if cfg.redis.sentinel is not None:
        if not cfg.redis.sentinel.hosts:
            raise ConfigError('redis.sentinel.hosts: list at least one "host:port"')
        for i, h in enumerate(cfg.redis.sentinel.hosts):
            if not re.fullmatch(r"[^:\s]+:\d{1,5}", h) or not 0 < int(h.rsplit(":", 1)[1]) < 65536:
                raise ConfigError(f'redis.sentinel.hosts[{i}]: {h!r} must be "host:port" (port 1-65535)')
    if not cfg.sources:
        raise ConfigError("sources: declare at least one account or source (e.g. access_token)")
    named = {}
    for name, src in cfg.sources.items():
        if not SOURCE_NAME_RE.match(name):
            raise ConfigError(f"sources.{name}: a name is letters, digits, _ . - (at most 64), starting with a letter")
        if not re.match(r"^https?://[^\s/]+", src.url):
            raise ConfigError(f"sources.{name}.url: must be an http:// or https:// URL")
        method = src.method.upper()
        if method not in ("GET", "POST"):
            raise ConfigError(f"sources.{name}.method: must be GET or POST")
        if src.json is not None and method != "POST":
            raise ConfigError(f"sources.{name}.json: a body needs method: POST")
        if src.daily_quota is not None and src.daily_quota < 1:
            raise ConfigError(f"sources.{name}.daily_quota: at least 1 (leave it out when the source has no quota)")
        _check_wechat_placeholders(name, src)
        named[name] = dataclasses.replace(src, name=name, method=method)
    order = dependency_order(named)
    seen = set()
    secrets_seen = {cfg.server.secret: "server.secret"}
    for i, client in enumerate(cfg.clients):
        path = f"clients[{i}]"
        if not client.name or client.name in seen:
            raise ConfigError(f"{path}.name: give each client a unique name")
        if not CLIENT_NAME_RE.match(client.name) or client.name == "default":
            raise ConfigError(
                f"{path}.name: letters, digits, _ . - (at most 64), starting with a letter; "
                '"default" is taken by server.secret'
            )
        seen.add(client.name)
        check_secret(f"{path}.secret", client.secret)
        if client.secret in secrets_seen:
            raise ConfigError(f"{path}.secret: same as {secrets_seen[client.secret]}; give each client its own secret")
        secrets_seen[client.secret] = f"{path}.secret"
        for s in client.sources:
            if s not in named:
                raise ConfigError(f"{path}.sources: {s!r} is no source (known: {', '.join(named)})")
    # Webhooks: an account's (its sources carry none of their own) and those of sources declared by hand.
    for name, acc in cfg.accounts.items():
        check_hooks(f"accounts.{name}.notify", acc.notify, secrets_seen)
    for name, src in named.items():
        check_hooks(f"sources.{name}.notify", src.notify, secrets_seen)
    if cfg.jwt is not None:
        if not cfg.jwt.keys:
            raise ConfigError("jwt.keys: give at least one kid: key, or remove jwt")
        for kid, key in cfg.jwt.keys.items():
            check_secret(f"jwt.keys.{kid}", key)
            if len(key) < 32:
                raise ConfigError(f"jwt.keys.{kid}: an HS256 key needs at least 32 characters")
        if not cfg.jwt.audience:
            raise ConfigError("jwt.audience: must not be empty; e.g. wechat-token-server")
        if not 0 <= cfg.jwt.leeway <= 300:
            raise ConfigError("jwt.leeway: must be between 0 and 300 seconds")
    return dataclasses.replace(cfg, sources={n: named[n] for n in order})
