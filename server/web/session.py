"""The status page's login: the operator secret posted once, then a signed session cookie.

A browser cannot send ``X-Token-Secret``, so the page authenticates the way browsers do:

- ``POST /wechat/status/login`` with the form field ``secret`` (``server.secret``, the
  operator's; a client's secret is refused like a wrong one).  It passes the same brute-force
  limit as the API (:attr:`Authenticator.failures`, per IP): a wrong secret is counted, and
  an IP over its limit gets 429 whatever it sends.  The secret travels in the body, never in
  a URL, and is never stored: the cookie holds a random session id only.
- The session cookie is a Tornado signed value (HMAC-SHA256 with a timestamp) whose key is
  derived from ``server.secret`` by HMAC (:func:`cookie_key`).  So a session survives a
  restart and is valid on every instance with the same config; changing ``server.secret``
  ends every session.  It lasts :data:`SESSION_SECONDS` from login (not sliding) and is
  ``HttpOnly``, ``SameSite=Strict``, ``Path=/wechat/status`` and ``Secure`` when the request
  came over TLS (directly, or ``X-Forwarded-Proto: https`` from a trusted proxy).
- State-changing requests carry ``X-CSRF-Token``: an HMAC of the session id under a second
  derived key, handed to the page by the session-authenticated data endpoint (a cross-site
  page can neither read that answer nor set the header without CORS, which we never grant).
- Logout clears the cookie in that browser.  Sessions are stateless: a copied cookie stays
  valid until it expires or ``server.secret`` changes (see docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import tornado.web
from tornado.httputil import HTTPServerRequest

from server.auth import OPERATOR, Authenticator, AuthError, Principal

COOKIE = "wts_session"
COOKIE_PATH = "/wechat/status"
#: a session's life from login, seconds (a working day)
SESSION_SECONDS = 8 * 3600
CSRF_HEADER = "X-CSRF-Token"


def cookie_key(server_secret: str, purpose: str) -> bytes:
    """A key for ``purpose`` derived from ``server.secret``: knowing it tells nothing of the
    secret, and each purpose (cookie signing, CSRF) gets its own."""
    return hmac.new(server_secret.encode("utf-8", "surrogatepass"), f"wechat-token-server status page {purpose} v1".encode(), hashlib.sha256).digest()


class Sessions:
    """Login, session cookie and CSRF token of the status page (see the module docstring).

    Holds derived keys only, never ``server.secret`` itself.
    """

    def __init__(self, server_secret: str, auth: Authenticator) -> None:
        self.rekey(server_secret)
        self.auth = auth

    def rekey(self, server_secret: str) -> None:
        """Keys derived from a (reloaded) ``server.secret``: sessions signed with the old one end."""
        self._signing = cookie_key(server_secret, "cookie").hex()
        self._csrf = cookie_key(server_secret, "csrf")

    def __repr__(self) -> str:
        return "Sessions(<derived keys>)"

    # --- login -----------------------------------------------------------------------------

    async def check_login(self, secret: str, ip: str) -> Principal:
        """The operator's principal if ``secret`` is ``server.secret``; else AuthError: 400 for
        an empty form (not counted), 403 for any other secret (counted against ``ip``), 429
        while ``ip`` is over the failure limit.  The order of server.auth.authenticate: no
        await between this process's own count, the comparison and counting a failure."""
        failures = self.auth.failures
        key = self.auth.limit_key(ip)
        wait = await failures.retry_after(key)
        if wait > 0:
            raise AuthError(429, "too many failed logins", f"ip {key} over its failure limit", retry_after=wait)
        if not secret:
            raise AuthError(400, "enter the operator secret (server.secret)")
        wait = failures.over_here(key)
        if wait > 0:
            raise AuthError(429, "too many failed logins", f"ip {key} over its failure limit", retry_after=wait)
        found = self.auth.principal_for_secret(secret)
        # server.secret's principal is the only one without a scope: a client's secret, even
        # one named in a JWT as "default", does not open the operator's page.
        if found is None or found.name != OPERATOR or found.sources is not None:
            wait = await failures.hit(key)
            detail = f"status page login with a wrong secret from {ip}"
            if wait > 0:
                raise AuthError(429, "too many failed logins", detail, retry_after=wait)
            raise AuthError(403, "wrong secret", detail)
        return Principal(OPERATOR, via="session")

    # --- the cookie ------------------------------------------------------------------------

    def start(self, handler: tornado.web.RequestHandler) -> None:
        """Set a new session cookie on ``handler``'s response (after a successful login)."""
        value = tornado.web.create_signed_value(self._signing, COOKIE, secrets.token_urlsafe(18))
        handler.set_cookie(
            COOKIE,
            value.decode("ascii"),
            path=COOKIE_PATH,
            max_age=SESSION_SECONDS,
            httponly=True,
            secure=self.over_tls(handler.request),
            samesite="Strict",
        )

    def end(self, handler: tornado.web.RequestHandler) -> None:
        handler.clear_cookie(COOKIE, path=COOKIE_PATH, httponly=True, secure=self.over_tls(handler.request), samesite="Strict")

    def session_id(self, handler: tornado.web.RequestHandler) -> str | None:
        """The id of the request's valid session, or None (no cookie, bad signature, expired)."""
        raw = handler.get_cookie(COOKIE)
        if not raw:
            return None
        value = tornado.web.decode_signed_value(self._signing, COOKIE, raw, max_age_days=SESSION_SECONDS / 86400)
        return value.decode("ascii", "replace") if value else None

    def over_tls(self, request: HTTPServerRequest) -> bool:
        """Whether the browser reached us over TLS: our own protocol, or the word of a trusted
        proxy (anyone else could send ``X-Forwarded-Proto``)."""
        if request.protocol == "https":
            return True
        proto = request.headers.get("X-Forwarded-Proto", "")
        return proto.strip().lower() == "https" and self.auth.from_trusted_proxy(request)

    # --- CSRF ------------------------------------------------------------------------------

    def csrf_token(self, session_id: str) -> str:
        return hmac.new(self._csrf, session_id.encode("ascii", "replace"), hashlib.sha256).hexdigest()

    def check_csrf(self, handler: tornado.web.RequestHandler, session_id: str) -> bool:
        """Whether the request carries this session's CSRF token in ``X-CSRF-Token``."""
        presented = handler.request.headers.get(CSRF_HEADER, "")
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self.csrf_token(session_id).encode("ascii"))
