"""Who is calling, from where, and whether they may: IP rules, brute-force limit, credentials.

The gate a request passes, in this order (handlers call it from ``prepare``):

1. **Client IP** (:meth:`Authenticator.client_ip`): the direct peer, unless that peer is
   in ``server.trusted_proxies``; then ``X-Real-IP``, else the right-most address of
   ``X-Forwarded-For`` that is not itself a trusted proxy.  Values that do not parse as
   an IP address are ignored (the peer is used).
2. **IP allowlist** (:meth:`Authenticator.check_ip`): ``server.allow_ips``, addresses and
   CIDR ranges compared as networks by :mod:`ipaddress` (never as text).  403 before
   anything else, so a refused IP learns nothing.  A direct peer that could only ever get
   that 403 is not even kept: :meth:`Authenticator.accepts_peer`, checked at accept by
   :mod:`server.listener`.
3. **Brute force**: an IP with ``server.auth_failures_per_minute`` failed
   authentications in its current minute gets 429 (with ``Retry-After``) for every
   request, the right secret included, until that minute is over.
4. **Credential** (:meth:`Authenticator.authenticate`): a secret in ``X-Token-Secret``,
   ``Authorization: Bearer S`` or the ``secret`` query argument, compared with every
   configured secret by ``hmac.compare_digest`` over SHA-256 digests (constant time; every
   candidate is compared so the time does not tell which nearly matched).  With ``jwt``
   configured, a bearer value shaped like a JWT is verified as one by PyJWT instead.  None
   presented: 401; a wrong one: 403, counted by the brute-force limit.

Forced refreshes that start an upstream call are limited per client and source
(:meth:`Authenticator.forcerefresh_permit`, given to the refresher, which asks for it just
before the call: a request that joins a flight, carries a stale ``old`` or is answered
from a recent fetch is a read and is not counted).

Both limits are counted in Redis (:mod:`server.ratelimit`, the ``limits`` library), so
they hold across every instance; while Redis is unreachable each process counts alone.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import jwt
from tornado.httputil import HTTPServerRequest

from server.config import Config
from server.ratelimit import SharedLimit
from server.redact import Redactor, config_secrets, printable
from server.state import NotPermitted

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Three base64url parts (the signature may be empty, as in an ``alg: none`` token).
JWT_SHAPE_RE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
#: What a JWT ``sub`` may look like to be shown in logs as is.
#: An IPv6 client is limited per /64: one host usually owns a whole /64.
IPV6_LIMIT_PREFIX = 64


class AuthError(Exception):
    """The request may not go on: ``status`` (400 / 401 / 403 / 429), a short ``reason`` for
    the client, ``detail`` for the log only, ``retry_after`` seconds for a 429."""

    def __init__(self, status: int, reason: str, detail: str = "", retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail or reason
        self.retry_after = retry_after


#: The principal of ``server.secret``: the operator, who may use every source and whose
#: forced refresh retries a blocked source.
OPERATOR = "default"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` for logs, ``sources`` it may use (None: all),
    ``via`` how it proved itself ("secret" or "jwt"), ``metrics`` whether it was given
    ``/metrics`` (``clients[].metrics``)."""

    name: str
    sources: frozenset[str] | None = None
    via: str = "secret"
    metrics: bool = False

    def may_use(self, source: str) -> bool:
        return self.sources is None or source in self.sources

    @property
    def is_operator(self) -> bool:
        """Proved by ``server.secret`` itself (a JWT may carry any ``sub``)."""
        return self.name == OPERATOR and self.via == "secret"

    @property
    def may_read_metrics(self) -> bool:
        """``/metrics`` shows every source, so a scope cannot filter it: the operator (by
        the secret, not the name: a JWT may carry any ``sub``) or a client given it."""
        return self.metrics or self.is_operator


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str | None) -> IPAddress | None:
    """An address from a header or the peer, IPv4-mapped IPv6 unwrapped; None if it is not one."""
    if not text:
        return None
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # "fe80::1%<3,000 characters>" parses; a zone means nothing beyond this host, and
        # kept it would carry a client-chosen string into every log line.
        return ipaddress.IPv6Address(int(ip))
    return ip


def _networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _single(request: HTTPServerRequest, header: str) -> str | None:
    """A header's one value; None when absent; AuthError(400) when sent more than once."""
    values = request.headers.get_list(header)
    if len(values) > 1:
        raise AuthError(400, f"repeated {header} header")
    return values[0] if values else None


def presented_credential(request: HTTPServerRequest) -> tuple[str, str] | None:
    """``(where, value)`` of the credential: Authorization Bearer, X-Token-Secret or the
    ``secret`` query argument, first found in that order; None if absent.

    A repeated header or argument is AuthError(400): two proxies could each pick a
    different one, so the request is ambiguous.
    """
    auth = _single(request, "Authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        value = auth[7:].strip()
        if value:
            return "bearer", value
    header = _single(request, "X-Token-Secret")
    if header:
        return "header", header
    values = request.query_arguments.get("secret")
    if values:
        if len(values) > 1:
            raise AuthError(400, "repeated argument secret")
        if values[0]:
            return "query", values[0].decode("utf-8", "replace")
    return None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class Authenticator:
    """The gate described in the module docstring, built from the config and the two
    shared limits (failed authentications per IP, forced refreshes per client and source)."""

    def __init__(self, cfg: Config, failures: SharedLimit, forced: SharedLimit) -> None:
        self.failures = failures
        self.forced = forced
        self._configure(cfg)

    def reconfigure(self, cfg: Config) -> None:
        """A reloaded config: secrets, clients, JWT keys, IP rules and the two limits' rates
        apply from the next request (the limits' counts so far stay)."""
        self.failures.set_rate(cfg.server.auth_failures_per_minute)
        self.forced.set_rate(cfg.server.forcerefresh_per_minute)
        self._configure(cfg)

    def _configure(self, cfg: Config) -> None:
        # Digests, not the secrets: equal-length inputs for compare_digest, and a repr
        # or a heap dump of this object shows no secret.
        self._secrets: list[tuple[bytes, Principal]] = [(_digest(cfg.server.secret), Principal(OPERATOR))]
        self._clients: dict[str, Principal] = {}
        for client in cfg.clients:
            principal = Principal(client.name, frozenset(client.sources), metrics=client.metrics)
            self._clients[client.name] = principal
            self._secrets.append((_digest(client.secret), principal))
        self._jwt = cfg.jwt
        self._sources = frozenset(cfg.sources)
        self._allow = _networks(cfg.server.allow_ips)
        self._trusted = _networks(cfg.server.trusted_proxies)
        self._probes = _networks(cfg.server.probe_ips)
        #: masks configured secrets in texts that came from upstream (see server.redact)
        self.redact = Redactor(config_secrets(cfg))

    def __repr__(self) -> str:
        return f"Authenticator({len(self._secrets)} secrets, jwt={'on' if self._jwt else 'off'})"

    # --- where from ----------------------------------------------------------------------

    def _is_trusted(self, ip: IPAddress) -> bool:
        return any(ip in net for net in self._trusted)

    def client_ip(self, request: HTTPServerRequest) -> str:
        """The client's address as text (see the module docstring)."""
        peer = parse_ip(request.remote_ip)
        if peer is None:
            return request.remote_ip or "-"  # a unix socket: nothing to believe or check
        if not self._is_trusted(peer):
            return str(peer)
        real = request.headers.get_list("X-Real-IP")
        if len(real) == 1 and (ip := parse_ip(real[0])) is not None:
            return str(ip)
        hops = ",".join(request.headers.get_list("X-Forwarded-For")).split(",")
        found: IPAddress | None = None
        for hop in reversed(hops):
            if not hop.strip():
                continue
            ip = parse_ip(hop)
            if ip is None:
                return str(peer)  # garbage where the client should be: believe nothing
            if not self._is_trusted(ip):
                return str(ip)
            found = ip
        return str(found or peer)  # every hop a trusted proxy: the first one is the client

    def from_trusted_proxy(self, request: HTTPServerRequest) -> bool:
        """Whether the direct peer is in ``server.trusted_proxies`` (its ``X-Forwarded-*``
        headers may be believed)."""
        peer = parse_ip(request.remote_ip)
        return peer is not None and self._is_trusted(peer)

    def accepts_peer(self, address: str) -> bool:
        """Whether a direct peer may keep its connection (checked at accept, before a byte is read).

        With ``server.allow_ips`` set, only an allowed peer, a trusted proxy (the client
        behind it is checked per request) or a ``server.probe_ips`` peer (for ``/healthz`` and ``/readyz``;
        its other requests get 403) is kept.  Everyone else would only ever get a 403, so
        they are not given a file descriptor, a buffer and a header timeout to hold first.
        A peer that is no IP address (a unix socket) is kept.
        """
        if not self._allow:
            return True
        ip = parse_ip(address)
        return ip is None or any(ip in net for nets in (self._allow, self._trusted, self._probes) for net in nets)

    def check_query_secret(self, request: HTTPServerRequest) -> None:
        """AuthError(400) for a ``secret`` query argument on a request that came through a
        proxy: a trusted peer that forwarded ``X-Real-IP`` or ``X-Forwarded-For``.

        The proxy has already written the URL into its logs (nginx's error log writes the
        request line whenever a backend fails), so the secret must travel in a header.
        Tornado decodes argument names, so ``?s%65cret=`` is refused here whatever the
        proxy's own rules saw.  A direct caller (no proxy) may still use the argument.
        """
        if "secret" not in request.query_arguments:
            return
        peer = parse_ip(request.remote_ip)
        forwarded = "X-Real-IP" in request.headers or "X-Forwarded-For" in request.headers
        if peer is not None and self._is_trusted(peer) and forwarded:
            raise AuthError(400, "send the secret in the X-Token-Secret header, not in the URL", "secret in the query string through a proxy")

    def check_ip(self, ip: str) -> None:
        """AuthError(403) unless ``ip`` is in ``server.allow_ips`` (empty: any IP)."""
        if not self._allow:
            return
        addr = parse_ip(ip)
        if addr is None or not any(addr in net for net in self._allow):
            raise AuthError(403, "ip not allowed", f"ip {printable(ip, 64)} not in server.allow_ips")

    @staticmethod
    def limit_key(ip: str) -> str:
        """The brute-force key of an IP: the address, or its /64 for IPv6."""
        addr = parse_ip(ip)
        if isinstance(addr, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((addr, IPV6_LIMIT_PREFIX), strict=False))
        return str(addr) if addr is not None else ip

    # --- who -----------------------------------------------------------------------------

    async def authenticate(self, request: HTTPServerRequest, ip: str) -> Principal:
        """The caller, or AuthError: 429 while ``ip`` is over its failure limit, 400 for an
        ambiguous credential, 401 for none, 403 for a wrong one (counted against ``ip``)."""
        key = self.limit_key(ip)
        wait = await self.failures.retry_after(key)
        if wait > 0:
            raise AuthError(429, "too many failed authentications", f"ip {key} over its failure limit", retry_after=wait)
        credential = presented_credential(request)
        if credential is None:
            raise AuthError(401, "missing secret")
        where, value = credential
        # This process's own count, checked with no await before the comparison (and the
        # failure counted with none after it): a burst of concurrent guesses cannot all be
        # compared before the first wrong one is counted.
        wait = self.failures.over_here(key)
        if wait > 0:
            raise AuthError(429, "too many failed authentications", f"ip {key} over its failure limit", retry_after=wait)
        try:
            if where == "bearer" and self._jwt is not None and JWT_SHAPE_RE.match(value):
                return self._verify_jwt(value)
            return self._match_secret(value)
        except AuthError as e:
            e.detail = f"{e.detail} ({where}) from {ip}"
            wait = await self.failures.hit(key)
            if wait > 0:
                raise AuthError(429, "too many failed authentications", e.detail, retry_after=wait) from None
            raise

    def _match_secret(self, secret: str) -> Principal:
        presented = _digest(secret)
        found = None
        for digest, principal in self._secrets:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        if found is None:
            raise AuthError(403, "wrong secret")
        return found

    def _verify_jwt(self, token: str) -> Principal:
        """A Principal from a valid HS256 JWT, or AuthError(403).

        The key comes from ``jwt.keys`` by the ``kid`` header; PyJWT checks the signature
        (HS256 only: ``none`` and RS256 are refused), ``exp`` (required, with
        ``jwt.leeway``), ``aud`` and that ``sub`` is present.  Scope: the client named by
        ``sub`` if there is one, else the ``sources`` claim within the configured sources,
        else nothing.
        """
        assert self._jwt is not None
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except (jwt.PyJWTError, ValueError, TypeError):
            raise AuthError(403, "invalid token", "jwt: unreadable header") from None
        key = self._jwt.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(403, "invalid token", f"jwt: unknown kid {printable(str(kid), 64)}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=["HS256"],
                audience=self._jwt.audience,
                options={"require": ["exp", "aud", "sub"]},
                leeway=self._jwt.leeway,
            )
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            # PyJWT's messages name the failed check, never the token or the key.
            raise AuthError(403, "invalid token", f"jwt (kid {kid}): {type(e).__name__}: {e}") from None
        sub = printable(str(claims["sub"]), 64)
        client = self._clients.get(sub)
        if client is not None:
            return Principal(sub, client.sources, via="jwt", metrics=client.metrics)
        claimed = claims.get("sources")
        names = claimed if isinstance(claimed, list) else []
        return Principal(sub, frozenset(n for n in names if isinstance(n, str)) & self._sources, via="jwt")

    # --- how often -----------------------------------------------------------------------

    def forcerefresh_permit(self, principal: Principal, source: str) -> Callable[[], Awaitable[None]]:
        """What the refresher awaits just before a forced refresh's own upstream call: counts
        it for ``principal`` and ``source``, or raises NotPermitted past the limit."""

        async def permit() -> None:
            wait = await self.forced.hit(f"{principal.name}/{source}")
            if wait > 0:
                raise NotPermitted(f"client {principal.name} over its forced refresh limit for {source}", wait)

        return permit

    # --- the WeChat-shaped face (server.face) ----------------------------------------------

    def principal_for_secret(self, secret: str) -> Principal | None:
        """The principal whose request secret ``secret`` is (``server.secret`` or a client's),
        compared in constant time; None when it is nobody's.  The face accepts it in place of
        an account's AppSecret, for the accounts that principal may use."""
        try:
            return self._match_secret(secret)
        except AuthError:
            return None
