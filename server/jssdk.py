"""JS-SDK signatures: the formula, and which page URLs and origins an account may sign for.

Pure functions, no I/O (the HTTP endpoint is :mod:`server.jssdk_handler`).

WeChat's formula (WECHAT_API.md, *JS-SDK signature*)::

    sha1("jsapi_ticket=" + ticket + "&noncestr=" + nonce + "&timestamp=" + ts + "&url=" + url)

keys in that order, raw values, no URL escaping; ``url`` is the page URL without ``#`` and what
follows.  WeCom signs ``wx.config`` (corp jsapi ticket) and ``wx.agentConfig`` (agent ticket)
with the same formula.

``allowed_domains`` entries (``accounts.NAME.jssdk.allowed_domains``, checked by --check):

- ``shop.example.com``: that host exactly (any port);
- ``*.example.com``: every subdomain of example.com, at any depth, but not example.com itself;
- either with ``:PORT``: that port only (the URL's explicit port, else 80 / 443 by scheme).

Hosts compare case-insensitively, as DNS does.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

#: Longest page URL signed, in characters.  2048 is the de facto safe URL length (the old
#: Internet Explorer limit every CDN and proxy still honours); a page URL beyond it is far
#: more likely an attack on our parsing or logs than a page someone serves in WeChat.
MAX_PAGE_URL = 2048
NONCE_LENGTH = 16  # the length of WeChat's own example nonce
_NONCE_ALPHABET = string.ascii_letters + string.digits
#: A URL's authority after the userinfo check: a DNS name (or IPv4 address) and an optional port.
#: Anything else (IPv6 literals, percent-encoding, underscores) is no JS-SDK safe domain WeChat
#: accepts, and refusing it leaves no room for two URL parsers to disagree about the host.
_AUTHORITY_RE = re.compile(r"^(?P<host>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?)(?::(?P<port>[0-9]{1,5}))?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class BadPageURL(ValueError):
    """The page URL cannot be signed; ``str()`` is a short reason safe to show (no value echoed)."""


@dataclass(frozen=True)
class Page:
    """A page URL that may be signed: ``url`` (fragment cut: what is signed), its lower-case
    ``host`` and its effective ``port``."""

    url: str
    host: str
    port: int


def sign(ticket: str, noncestr: str, timestamp: int | str, url: str) -> str:
    """The JS-SDK signature (40 lower-case hex digits) of ``url`` with ``ticket``.

    ``url`` is signed exactly as given: cut its fragment first (:func:`parse_page` does).
    """
    text = f"jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={url}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def new_nonce() -> str:
    """A fresh random ``nonceStr``: 16 letters and digits from the OS's CSPRNG."""
    return "".join(secrets.choice(_NONCE_ALPHABET) for _ in range(NONCE_LENGTH))


def parse_page(raw: str) -> Page:
    """The page to sign from ``raw`` (what the page sends: ``location.href.split('#')[0]``).

    Raises BadPageURL for a URL that is too long, not printable ASCII (a browser's
    ``location.href`` always is: anything else would be signed as bytes WeChat never
    compares with), not http(s), with userinfo (``https://a@b/``: parsers disagree on
    which host that is), or without a plain host.
    """
    if len(raw) > MAX_PAGE_URL:
        raise BadPageURL(f"url longer than {MAX_PAGE_URL} characters")
    # Backslashes count as slashes to browsers but not to urllib: refused, like controls and spaces.
    if any(not ("!" <= c <= "~") or c == "\\" for c in raw):
        raise BadPageURL("url must be printable ASCII without spaces or backslashes (as location.href is)")
    url = raw.split("#", 1)[0]
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced "[" (an IPv6 literal urllib cannot read)
        raise BadPageURL("url has no valid host") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise BadPageURL("url must be http:// or https://")
    if "@" in parts.netloc:
        raise BadPageURL("url must not carry userinfo (user@host)")
    found = _AUTHORITY_RE.match(parts.netloc)
    if found is None or (found["port"] is not None and not 0 < int(found["port"]) <= 65535):
        raise BadPageURL("url has no valid host")
    port = int(found["port"]) if found["port"] is not None else _DEFAULT_PORTS[scheme]
    return Page(url=url, host=found["host"].lower(), port=port)


def host_allowed(host: str, port: int, allowed_domains: Iterable[str]) -> bool:
    """Whether ``host`` (lower case) on ``port`` is covered by ``allowed_domains`` (see the
    module docstring for the rules)."""
    for entry in allowed_domains:
        name, _, want_port = entry.lower().partition(":")
        if want_port and int(want_port) != port:
            continue
        if name.startswith("*."):
            suffix = name[1:]  # ".example.com": a label must come before it
            if host.endswith(suffix) and len(host) > len(suffix):
                return True
        elif host == name:
            return True
    return False


def origin_allowed(origin: str, allowed_domains: Iterable[str]) -> bool:
    """Whether a request's ``Origin`` header (``https://shop.example.com[:port]``) is that of a
    page on ``allowed_domains``.  ``null``, a path or anything unparsable: False."""
    # An origin is never longer than a page URL: the same character rules apply.
    if len(origin) > MAX_PAGE_URL or any(not ("!" <= c <= "~") or c == "\\" for c in origin):
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        return False
    found = _AUTHORITY_RE.match(parts.netloc)
    if found is None:
        return False
    port = int(found["port"]) if found["port"] is not None else _DEFAULT_PORTS[scheme]
    return 0 < port <= 65535 and host_allowed(found["host"].lower(), port, allowed_domains)
