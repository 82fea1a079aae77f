"""Who is calling: the request secret, named clients and their sources.

A caller presents a secret as the ``secret`` query argument, the ``X-Token-Secret``
header or ``Authorization: Bearer S``.  It is compared with every configured secret
with ``hmac.compare_digest`` (constant time, and every candidate is compared so the
time does not tell which one nearly matched).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from tornado.httputil import HTTPServerRequest

from server.config import Config


class AuthError(Exception):
    """Authentication failed: ``status`` (401 / 403) and a short reason for the client."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``name`` for logs, ``sources`` it may use (None: all)."""

    name: str
    sources: frozenset[str] | None = None

    def may_use(self, source: str) -> bool:
        return self.sources is None or source in self.sources


def presented_secret(request: HTTPServerRequest) -> str | None:
    """The secret from the query, X-Token-Secret, or Authorization: Bearer; None if absent."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    header = request.headers.get("X-Token-Secret")
    if header:
        return header
    values = request.query_arguments.get("secret")
    if values:
        return values[-1].decode("utf-8", "replace")
    return None


class Authenticator:
    """Maps a presented secret to a Principal."""

    def __init__(self, cfg: Config) -> None:
        # Digests, not the secrets: equal-length inputs for compare_digest, and a repr
        # or a heap dump of this object shows no secret.
        self._secrets: list[tuple[bytes, Principal]] = [(_digest(cfg.server.secret), Principal("default"))]
        for client in cfg.clients:
            self._secrets.append((_digest(client.secret), Principal(client.name, frozenset(client.sources))))

    def __repr__(self) -> str:
        return f"Authenticator({len(self._secrets)} secrets)"

    def authenticate(self, request: HTTPServerRequest) -> Principal:
        """The caller, or AuthError(401) with no secret, AuthError(403) with a wrong one."""
        secret = presented_secret(request)
        if secret is None:
            raise AuthError(401, "missing secret")
        presented = _digest(secret)
        found = None
        for digest, principal in self._secrets:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        if found is None:
            raise AuthError(403, "wrong secret")
        return found


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()
