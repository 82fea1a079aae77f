"""Keep secrets out of log lines, and out of the few upstream texts a response repeats.

The code never logs a secret on purpose; this is the second line of defence for what it
cannot control: an upstream (or a proxy in front of it) that echoes the request URL or a
parameter in its error message, an exception from a library that prints its arguments, a
future log call written carelessly.

:func:`config_secrets` collects every secret of a config: ``server.secret``, the clients'
secrets, the JWT keys, the Redis password (also inside ``redis.url``), the Sentinel
passwords, every string under ``sources.*.args`` / ``json`` / ``force`` whose key looks
secret (secret, appsecret, corpsecret, password, key...), and the webhooks' secrets
(``accounts.*.notify`` / ``sources.*.notify``).  A :class:`Redactor` replaces
them with ``***``, and also masks what looks like a JWT, the password in a URL's
``user:password@`` and a URL's query string (``https://host/path?***``).
:class:`RedactFilter` applies it to a log record's message, arguments, exception text and
stack; :func:`install` puts the filter on the root logger's handlers, which every record
of every logger reaches.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from server.config import TEMPLATE_RE, Config

MASK = "***"
#: Shorter "secrets" are not masked: replacing every "abc" in every line would garble logs.
MIN_MASKED_LENGTH = 6
#: Keys under sources.*.args / json whose string values are secrets.
SECRET_KEY_RE = re.compile(r"secret|passw|key|credential|private", re.I)

_JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_URL_QUERY_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s?#'\"<>]*)\?[^\s#'\"<>]*")
_URL_PASSWORD_RE = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"<>]*:)[^\s/@'\"<>]+@")


def printable(text: str, limit: int = 200) -> str:
    """``text`` safe for one log line: non-printable characters as ``?``, cut at ``limit``
    characters (marked ``...``), so a client cannot forge or flood log lines."""
    if len(text) <= limit and text.isprintable():
        return text  # the usual case, checked in C
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return "".join(c if c.isprintable() else "?" for c in cut)


def _secret_values(value: Any, key: str = "") -> list[str]:
    """Strings under secret-looking keys of a (nested) args / json value, templates excluded."""
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in _secret_values(v, str(k))]
    if isinstance(value, list):
        return [s for v in value for s in _secret_values(v, key)]
    if isinstance(value, str) and SECRET_KEY_RE.search(key) and not TEMPLATE_RE.fullmatch(value.strip()):
        return [value]
    return []


def config_secrets(cfg: Config) -> list[str]:
    """Every secret the config holds (see the module docstring), longest first."""
    found = [cfg.server.secret]
    found += [c.secret for c in cfg.clients]
    if cfg.jwt is not None:
        found += list(cfg.jwt.keys.values())
    r = cfg.redis
    found += [r.password or ""]
    if r.url:
        parts = urllib.parse.urlsplit(r.url)
        found += [urllib.parse.unquote(parts.password or ""), parts.password or ""]
        # ?password=...: redis-py passes unknown query arguments to its connections.  Both
        # the value it uses (decoded, as parse_qs decodes it) and its spelling in the URL,
        # as for the password in user:password@ above.
        for pair in parts.query.split("&"):
            key, _, raw = pair.partition("=")
            if "passw" in urllib.parse.unquote_plus(key).lower():
                found += [urllib.parse.unquote_plus(raw), raw]
    if r.sentinel is not None:
        found += [r.sentinel.password or "", r.sentinel.sentinel_password or ""]
    for src in cfg.sources.values():
        for part in (src.args, src.json or {}, src.force):
            found += _secret_values(part)
    for hooks in [a.notify for a in cfg.accounts.values()] + [s.notify for s in cfg.sources.values()]:
        found += [hook.secret for hook in hooks]
    unique = {s for s in found if len(s) >= MIN_MASKED_LENGTH}
    return sorted(unique, key=len, reverse=True)


class Redactor:
    """``redactor(text)``: ``text`` with the secrets, JWTs and URL queries and passwords masked."""

    def __init__(self, secrets: Iterable[str]) -> None:
        values = sorted({s for s in secrets if len(s) >= MIN_MASKED_LENGTH}, key=len, reverse=True)
        self._count = len(values)
        self._values = tuple(values)
        # One alternation, longest first, so a secret containing another is masked whole.
        self._secrets = re.compile("|".join(map(re.escape, values))) if values else None

    def __repr__(self) -> str:
        return f"Redactor({self._count} secrets)"

    def adding(self, secrets: Iterable[str]) -> Redactor:
        """A redactor masking these secrets as well (a reload keeps masking the old ones)."""
        return Redactor([*self._values, *secrets])

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        # Every log record passes here: skip the patterns that cannot match (the access log's
        # lines hold neither a JWT nor a URL).
        if "eyJ" in text:
            text = _JWT_RE.sub(MASK, text)
        if "://" in text:
            text = _URL_PASSWORD_RE.sub(rf"\1{MASK}@", text)
            text = _URL_QUERY_RE.sub(rf"\1?{MASK}", text)
        return text


class RedactFilter(logging.Filter):
    """A handler filter that masks secrets in every record it sees (it never drops one)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: show the raw parts, masked
            message = f"{record.msg!r} {record.args!r}"
        # The formatted message replaces msg and args, so no formatter sees the raw args.
        record.msg = self.redact(message)
        record.args = ()
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            # exc_text is what formatters print; dropping exc_info keeps the raw
            # exception (whose args may hold a secret) from being formatted again.
            record.exc_text = self.redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def extend(cfg: Config, logger: logging.Logger | None = None) -> int:
    """Make every RedactFilter on ``logger``'s handlers (default: root) mask ``cfg``'s
    secrets too (a reloaded config); returns how many filters were extended."""
    found = 0
    for handler in (logger or logging.getLogger()).handlers:
        for flt in handler.filters:
            if isinstance(flt, RedactFilter):
                flt.redact = flt.redact.adding(config_secrets(cfg))
                found += 1
    return found


def install(cfg: Config, logger: logging.Logger | None = None) -> RedactFilter:
    """Put a RedactFilter for ``cfg``'s secrets on every handler of ``logger`` (default: root).

    Handlers, not the logger: a logger's filters see only records logged on that logger
    itself, a handler's see every record propagated to it.  Returns the filter (to remove it).
    """
    flt = RedactFilter(Redactor(config_secrets(cfg)))
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt
