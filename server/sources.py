"""A token source: how to build its upstream request and read the value from the answer.

A source is pure data plus two pure functions; it never does I/O.  The refresher gives
it the current values of the sources it depends on (``<<name>>``) and gets back an
:class:`UpstreamRequest`; :mod:`server.upstream` sends that request and hands the
decoded JSON back to :meth:`Source.parse`.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.config import TEMPLATE_RE, SourceConfig, template_names

#: WeChat says: reserve 512 bytes for a token.  Anything far longer is not a token.
MAX_VALUE_LENGTH = 2048
#: Token endpoints (official accounts, mini programs, WeCom) whose host also serves
#: ``getcallbackip``, the quota-free call that tells whether a token is alive.
TOKEN_PATHS = ("/cgi-bin/token", "/cgi-bin/stable_token", "/cgi-bin/gettoken")
CHECK_PATH = "/cgi-bin/getcallbackip"


class ParseError(Exception):
    """The upstream answered 200 but not with a usable value (the refresher retries)."""


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str = dataclasses.field(repr=False)  # with the query string: holds the appsecret, never log it
    body: bytes | None = dataclasses.field(repr=False)  # may hold the appsecret (stable_token)
    safe_url: str = ""  # scheme, host and path only: what logs may show


@dataclass(frozen=True)
class Fetched:
    value: str = dataclasses.field(repr=False)  # a whole token: never in a repr
    expires_in: float = 0.0  # seconds of life WeChat announced
    field: str = "access_token"  # the answer's field that held the value; our API answers with the same name


def _render(value: Any, values: Mapping[str, str]) -> Any:
    """Replace ``<<name>>`` in every string of a (nested) value; other types pass through."""
    if isinstance(value, str):
        return TEMPLATE_RE.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, Mapping):
        return {k: _render(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, values) for v in value]
    return value


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


class Source:
    """One credential declared under ``sources:`` in the config."""

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        deps: list[str] = []
        for part in (cfg.args, cfg.json, cfg.force):
            deps.extend(n for n in template_names(part) if n not in deps)
        #: names of the sources whose values this one's request needs, in order
        self.deps: tuple[str, ...] = tuple(deps)

    def __repr__(self) -> str:
        # args hold the appsecret: show only what is safe.
        return f"Source({self.name!r}, {self.cfg.method} {self.safe_url})"

    @property
    def safe_url(self) -> str:
        parts = urllib.parse.urlsplit(self.cfg.url)
        return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))

    def build_request(self, values: Mapping[str, str], force: bool = False) -> UpstreamRequest:
        """The request for a fetch, with ``<<name>>`` replaced from ``values``.

        ``force`` merges the source's ``force`` mapping into the JSON body when there is
        one, else into the query.  Raises KeyError when a dependency's value is missing.
        """
        cfg = self.cfg
        args = dict(cfg.args)
        body = dict(cfg.json) if cfg.json is not None else None
        if force:
            (body if body is not None else args).update(cfg.force)
        query = urllib.parse.urlencode({k: _query_value(v) for k, v in _render(args, values).items()})
        url = cfg.url + (("&" if "?" in cfg.url else "?") + query if query else "")
        data = None
        if body is not None:
            data = json.dumps(_render(body, values), ensure_ascii=False).encode()
        elif cfg.method == "POST":
            data = b"{}"
        return UpstreamRequest(cfg.method, url, data, self.safe_url)

    def waiting(self) -> str | None:
        """Why this source cannot be fetched yet although its dependencies can (None: it
        can).  Every configured source can; a platform's component_access_token waits for
        its first verify ticket (server.platform.tickets), which no source provides."""
        return None

    def rotates(self, force: bool) -> bool:
        """Whether a call issues a new value and retires all but the one before it (so a
        lost answer may leave the stored value WeChat's "previous"): the classic
        ``/cgi-bin/token`` always, ``stable_token`` only when forced, WeCom's ``gettoken``
        never (it answers the token it holds); any other source when forced or when it has
        no ``force`` mapping (the safe assumption for a ticket or an endpoint we do not know)."""
        path = urllib.parse.urlsplit(self.cfg.url).path
        if path.endswith("/cgi-bin/token"):
            return True
        if path.endswith("/cgi-bin/gettoken"):
            return False
        return force or not self.cfg.force

    def check_request(self, value: str) -> UpstreamRequest | None:
        """The ``getcallbackip`` request that tells whether ``value`` (a token of this
        source) is alive; None for a source that is no token endpoint (a ticket)."""
        parts = urllib.parse.urlsplit(self.cfg.url)
        if not parts.path.endswith(TOKEN_PATHS):
            return None
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rsplit("/cgi-bin/", 1)[0] + CHECK_PATH, "", ""))
        safe = urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", CHECK_PATH, "", ""))
        return UpstreamRequest("GET", base + "?" + urllib.parse.urlencode({"access_token": value}), None, safe)

    def parse(self, payload: Any) -> Fetched:
        """The value and its announced life from a decoded JSON answer with errcode 0.

        Raises ParseError when the field is missing or not a plausible token.
        """
        if not isinstance(payload, dict):
            raise ParseError("answer is not a JSON object")
        field = self.cfg.field or ("access_token" if "access_token" in payload else "ticket")
        value = payload.get(field)
        if not isinstance(value, str) or not value:
            raise ParseError(f"answer has no {field!r} field")
        if len(value) > MAX_VALUE_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
            raise ParseError(f"{field!r} is not a plausible token ({len(value)} characters)")
        expires_in = payload.get("expires_in")
        if isinstance(expires_in, str) and expires_in.isdigit():
            expires_in = int(expires_in)
        if not isinstance(expires_in, (int, float)) or isinstance(expires_in, bool) or expires_in <= 0:
            raise ParseError("answer has no positive expires_in")
        return Fetched(value, float(expires_in), field)
