"""The HTTP client to WeChat: one request per call, answers classified by what a refresher must do.

Every way a fetch can fail becomes an :class:`UpstreamError` whose ``kind`` says what to do
next (the table in shared/WECHAT_API.md):

- ``TRANSIENT``: retry later with backoff (-1, 45011, HTTP errors, timeouts, bad bodies,
  unknown errcodes: a code we do not know is retried, slowly, rather than given up on).
- ``FATAL``: a configuration or account problem; stop calling until an operator acts.
- ``QUOTA``: 45009, the daily quota is spent; stop until the quota resets.
- ``STALE_TOKEN``: 40001 / 40014 / 42001 from a call that *used* an access_token (a
  ticket): refresh that token once and retry once.  The same codes from a token endpoint
  mean a wrong secret and are FATAL.

Error messages never contain the request URL (its query holds the appsecret).
"""

from __future__ import annotations

import enum
import json
import logging
import re
import time
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server.sources import Fetched, ParseError, Source, UpstreamRequest

logger = logging.getLogger(__name__)


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    FATAL = "fatal"
    QUOTA = "quota"
    STALE_TOKEN = "stale_token"


FATAL_CODES = frozenset(
    {40002, 40013, 40125, 41002, 41004, 40243, 40164, 61004, 60020, 89501, 89503, 89506, 89507, 48001}
)
STALE_TOKEN_CODES = frozenset({40001, 40014, 42001})
#: errcode -> seconds to wait at least before the next try
RETRY_AFTER = {45011: 60.0}
_IP_RE = re.compile(r"invalid ip ([0-9A-Fa-f.:]+)")
MAX_BODY_BYTES = 1024 * 1024


class UpstreamError(Exception):
    """A failed fetch.  ``str()`` is safe to log: no URL, no secret."""

    def __init__(self, kind: ErrorKind, message: str, errcode: int | None = None, errmsg: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.errcode = errcode
        self.errmsg = errmsg[:300]
        self.retry_after = RETRY_AFTER.get(errcode or 0, 0.0)
        #: No errcode answer came back (timeout, HTTP error, unreadable body): WeChat may
        #: have issued a token nobody received, retiring the one before it.
        self.maybe_issued = errcode is None

    @property
    def ip(self) -> str | None:
        """For 40164 / 61004 / 60020: the caller IP WeChat saw, from errmsg."""
        m = _IP_RE.search(self.errmsg)
        return m.group(1) if m else None


def classify(errcode: int, uses_token: bool) -> ErrorKind:
    """What a refresher must do about a WeChat errcode (see the module docstring)."""
    if errcode in STALE_TOKEN_CODES:
        return ErrorKind.STALE_TOKEN if uses_token else ErrorKind.FATAL
    if errcode == 45009:
        return ErrorKind.QUOTA
    if errcode in FATAL_CODES:
        return ErrorKind.FATAL
    return ErrorKind.TRANSIENT


class Upstream:
    """Sends a source's request and returns its value, or raises UpstreamError.

    ``timeout`` is in seconds and bounds the whole request (connect included).
    """

    def __init__(self, timeout: float, client: AsyncHTTPClient | None = None) -> None:
        self.timeout = timeout
        # force_instance: a client of our own, bound to the running loop, closed by close().
        self.client = client or AsyncHTTPClient(force_instance=True, max_body_size=MAX_BODY_BYTES)

    def close(self) -> None:
        self.client.close()

    async def fetch(self, source: Source, request: UpstreamRequest, timeout: float | None = None) -> Fetched:
        """The value ``request`` fetches, waiting ``timeout`` seconds (default: the client's) for it."""
        started = time.monotonic()
        payload = await self._send(request, timeout or self.timeout)
        errcode = payload.get("errcode", 0) if isinstance(payload, dict) else 0
        if not isinstance(errcode, int):
            errcode = -1
        if errcode != 0:
            errmsg = str(payload.get("errmsg", ""))
            kind = classify(errcode, uses_token=bool(source.deps))
            raise UpstreamError(kind, f"errcode {errcode}: {errmsg[:300]}", errcode, errmsg)
        try:
            fetched = source.parse(payload)
        except ParseError as e:
            raise UpstreamError(ErrorKind.TRANSIENT, str(e)) from None
        logger.debug("source %s: fetched from %s in %.3fs", source.name, request.safe_url, time.monotonic() - started)
        return fetched

    async def check(self, request: UpstreamRequest, timeout: float) -> bool | None:
        """Whether WeChat accepts the token in ``request`` (a ``getcallbackip`` call): False
        when it answers 40001 / 40014 / 42001, None when it cannot tell (any other failure)."""
        try:
            payload = await self._send(request, timeout)
        except UpstreamError:
            return None
        errcode = payload.get("errcode", 0) if isinstance(payload, dict) else -1
        if errcode in STALE_TOKEN_CODES:
            return False
        return True if errcode == 0 else None

    async def _send(self, request: UpstreamRequest, timeout: float) -> Any:
        headers = {"Content-Type": "application/json"} if request.body is not None else {}
        req = HTTPRequest(
            request.url,
            method=request.method,
            body=request.body,
            headers=headers,
            connect_timeout=timeout,
            request_timeout=timeout,
            follow_redirects=False,
        )
        try:
            # raise_error=False only covers non-200 answers; a timeout still raises (code 599).
            response = await self.client.fetch(req, raise_error=False)
        except HTTPClientError:  # only code 599: a timeout or a lost connection
            raise UpstreamError(ErrorKind.TRANSIENT, f"no answer from {request.safe_url} (timeout)") from None
        except Exception as e:  # connection refused, DNS, TLS: these messages name no URL
            raise UpstreamError(ErrorKind.TRANSIENT, f"{request.safe_url}: {type(e).__name__}: {e}") from None
        if response.code != 200:
            raise UpstreamError(ErrorKind.TRANSIENT, f"HTTP {response.code} from {request.safe_url}")
        try:
            return json.loads(response.body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: a nesting bomb
            raise UpstreamError(ErrorKind.TRANSIENT, f"non-JSON answer from {request.safe_url}") from None
