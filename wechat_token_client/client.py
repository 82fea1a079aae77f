"""The client: values from the token server, cached, one request per key at a time.

Reads go to the server's HTTP API (``GET /wechat/token``, the secret in ``X-Token-Secret``) or,
in Redis mode, to the plain Redis key the server writes (``access_token``, ``shop.ticket``...,
under ``redis.prefix``) with its TTL.  A forced refresh always goes over HTTP
(``GET /wechat/token/forcerefresh?old=...``): only the server may ask WeChat for a new value.

Nothing here imports Tornado; ``redis`` is imported only when a Redis URL is given.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from wechat_token_client.errors import TokenServerError

logger = logging.getLogger(__name__)

#: A cache key: (type, account, appid).
Key = Tuple[str, Optional[str], Optional[str]]
#: Longest answer read from the server (a value is at most a few KiB).
MAX_ANSWER_BYTES = 64 * 1024
#: Seconds a cached value is used as it is after the server failed to answer for it (at most
#: ``max_age``), so that a hung server costs one ``timeout`` per pause, not one per call.
FAILURE_PAUSE = 5.0
USER_AGENT = "wechat-token-client"


@dataclass(frozen=True)
class Token:
    """A value and its life, on this process's monotonic clock (``time.monotonic()``).

    ``expires_at``: when the server said the value expires; ``fetched_at``: when the request
    that brought it was sent (so the life is never overestimated).
    """

    value: str = field(repr=False)
    expires_at: float
    fetched_at: float

    def remaining(self, now: float | None = None) -> float:
        """Seconds of life left (negative once expired)."""
        return self.expires_at - (time.monotonic() if now is None else now)

    def __repr__(self) -> str:
        # A whole token is a credential: a short prefix is enough to tell two apart.
        return f"Token({self.value[:6]}..., remaining={self.remaining():.0f}s)"


class _Flight:
    """One request in the air; the threads that asked for the same thing wait for its outcome."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._token: Token | None = None
        self._error: BaseException | None = None

    def finish(self, token: Token | None, error: BaseException | None) -> None:
        self._token, self._error = token, error
        self._done.set()

    def wait(self) -> Token:
        # The leader's request is bounded by the client's timeout, so this wait is too.
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, TokenServerError):
                raise self._error.copy()  # one exception object per thread: tracebacks differ
            raise self._error
        assert self._token is not None
        return self._token


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would resend our headers, the secret among them, to wherever a redirect points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


def _redact_url(url: str) -> str:
    """``url`` without a password in its userinfo (for reprs)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class TokenClient:
    """Values (access_token, tickets) of a wechat-token-server, cached in this process.

    ``url``: the server (``http://127.0.0.1:12123``); ``secret``: a request secret it accepts
    (``server.secret`` or a client's), sent in the ``X-Token-Secret`` header only.
    ``redis``: read the plain Redis keys instead of ``GET /wechat/token``: a ``redis://`` URL
    (needs the ``redis`` package: ``pip install 'wechat-token-client[redis]'``) or a
    ``redis.Redis`` client; ``prefix`` is the server's ``redis.prefix``.  Give ``url`` too and
    :meth:`refresh_after_rejection` can ask the server for a new value; without it, Redis mode
    can only read.

    ``max_age`` (seconds, default 60): a value is asked for again at most this long after it
    was fetched, so a value the server replaced reaches this process within ``max_age``.
    ``early`` (seconds, default 30): a value is asked for again once it has less life left
    than this (it must live long enough to be used); a cached value with less is never handed
    out, a fresh answer is handed out as the server gave it.
    ``timeout`` (seconds, default 5): for one HTTP request or Redis command.

    Thread safe.  However many threads ask for one key at once, one request is made and they
    all get its answer (or its error); requests for one key never overlap.  When the server
    cannot be reached or fails, a cached value with more than ``early`` seconds left is
    returned (and a warning logged) rather than an error, and the server is asked again only
    ``FAILURE_PAUSE`` seconds later (5, or ``max_age`` if shorter).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        secret: str | None = None,
        redis: Any = None,
        prefix: str = "",
        max_age: float = 60.0,
        early: float = 30.0,
        timeout: float = 5.0,
    ) -> None:
        if url is None and redis is None:
            raise ValueError("TokenClient needs url= (the token server) or redis= (its Redis)")
        if url is not None:
            if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
                raise ValueError("url must start with http:// or https://")
            if not secret:
                raise ValueError("secret= is required with url= (server.secret or a client's secret)")
        if max_age < 0 or early < 0 or timeout <= 0:
            raise ValueError("max_age and early must be >= 0 seconds, timeout > 0 seconds")
        self.url = url.rstrip("/") if url is not None else None
        self._secret = secret
        self.prefix = prefix
        self.max_age = float(max_age)
        self.early = float(early)
        self.timeout = float(timeout)
        self._redis_shown = _redact_url(redis) if isinstance(redis, str) else type(redis).__name__ if redis is not None else None
        self._redis = self._connect_redis(redis) if isinstance(redis, str) else redis
        self._opener = urllib.request.build_opener(_NoRedirect())
        self._lock = threading.Lock()  # guards the four dicts below
        self._cache: Dict[Key, Token] = {}
        self._paused_until: Dict[Key, float] = {}  # monotonic: no new request before then (a failure)
        self._flights: Dict[Any, _Flight] = {}
        self._request_locks: Dict[Key, threading.Lock] = {}

    def __repr__(self) -> str:
        # Never the secret; a Redis URL without its password.
        return f"TokenClient(url={self.url!r}, redis={self._redis_shown!r}, prefix={self.prefix!r}, max_age={self.max_age}, early={self.early})"

    @property
    def mode(self) -> str:
        """``"redis"`` when reads go to Redis, else ``"http"``."""
        return "redis" if self._redis is not None else "http"

    # -- the API ---------------------------------------------------------------------------------

    def get(self, type: str = "access_token", account: str | None = None, *, appid: str | None = None) -> str:
        """The current value of ``type`` (``access_token``, ``ticket``, ``wx_card_ticket``,
        ``agent_config_ticket``, or a source's full name) of ``account`` (its name on the server)
        or ``appid`` (HTTP only); neither: the server's default account.

        From the cache while the value is younger than ``max_age`` and has more than ``early``
        seconds left; else from the server.  Raises :class:`TokenServerError`.
        """
        return self.get_token(type, account, appid=appid).value

    def get_token(self, type: str = "access_token", account: str | None = None, *, appid: str | None = None) -> Token:
        """As :meth:`get`, with the value's remaining life (:class:`Token`)."""
        key = self._key(type, account, appid)
        cached = self._fresh(key)
        if cached is not None:
            return cached
        try:
            return self._fly(("get", key), key, lambda: self._fresh(key) or self._read(key))
        except TokenServerError as e:
            cached = self._usable(key)
            if cached is None:
                raise
            pause = min(FAILURE_PAUSE, self.max_age)
            with self._lock:
                self._paused_until[key] = time.monotonic() + pause
            logger.warning("%s; using the cached value (%.0f s left), asking again in %.0f s", e, cached.remaining(), pause)
            return cached

    def refresh_after_rejection(self, value: str, type: str = "access_token", account: str | None = None, *, appid: str | None = None) -> str:
        """A value to use instead of ``value``, which WeChat rejected (40001, 40014, 42001).

        ``GET /wechat/token/forcerefresh?old=value``: when ``value`` is still the server's
        current value it is replaced (one upstream call, however many callers and instances
        ask); when it is not (someone replaced it already), the current value comes back and
        nothing is fetched.  When this process already holds another value for the key, that
        one is returned without a request.  Threads rejecting the same value share one request.
        Then retry the WeChat call once with the answer; if WeChat rejects that too, do not
        loop: report it.  Raises :class:`TokenServerError` (429 when the client's forced
        refreshes are over ``server.forcerefresh_per_minute``).
        """
        key = self._key(type, account, appid)
        other = self._usable(key)
        if other is not None and other.value != value:
            return other.value

        def replace() -> Token:
            other = self._usable(key)
            if other is not None and other.value != value:
                return other  # replaced while this thread waited for the key
            token = self._force(key, value)
            self._store(key, token)
            return token

        try:
            return self._fly(("refresh", key, value), key, replace).value
        except BaseException:
            # WeChat rejected ``value``: whatever went wrong here, never hand it out again
            # from the cache (the server may well hold a new one by now).
            with self._lock:
                cached = self._cache.get(key)
                if cached is not None and cached.value == value:
                    del self._cache[key]
            raise

    def invalidate(self, type: str = "access_token", account: str | None = None, *, appid: str | None = None) -> None:
        """Forget the cached value: the next :meth:`get` asks the server."""
        with self._lock:
            self._cache.pop(self._key(type, account, appid), None)

    # -- cache and single flight -------------------------------------------------------------------

    def _key(self, type: str, account: str | None, appid: str | None) -> Key:
        if not type:
            raise ValueError("type must name a value: access_token, ticket, wx_card_ticket...")
        if appid is not None and self._redis is not None:
            raise ValueError("Redis keys are named by account, not appid: pass account=NAME (None: the default account)")
        return (type, account, appid)

    def _fresh(self, key: Key) -> Token | None:
        now = time.monotonic()
        with self._lock:
            token = self._cache.get(key)
            paused = now < self._paused_until.get(key, 0.0)
        if token is not None and (now - token.fetched_at < self.max_age or paused) and token.remaining(now) > self.early:
            return token
        return None

    def _usable(self, key: Key) -> Token | None:
        with self._lock:
            token = self._cache.get(key)
        return token if token is not None and token.remaining() > self.early else None

    def _store(self, key: Key, token: Token) -> None:
        with self._lock:
            self._cache[key] = token
            self._paused_until.pop(key, None)

    def _fly(self, flight_key: Any, key: Key, work: Callable[[], Token]) -> Token:
        """``work()`` once for every thread asking ``flight_key`` meanwhile, holding the key's
        request lock (so requests for one key never overlap); the others wait for its outcome."""
        with self._lock:
            flight = self._flights.get(flight_key)
            if flight is not None:
                leader = False
            else:
                leader = True
                flight = self._flights[flight_key] = _Flight()
            request_lock = self._request_locks.setdefault(key, threading.Lock())
        if not leader:
            return flight.wait()
        token: Token | None = None
        error: BaseException | None = None
        try:
            with request_lock:
                token = work()
            return token
        except BaseException as e:
            error = e
            raise
        finally:
            with self._lock:
                del self._flights[flight_key]
            flight.finish(token, error)

    # -- transports -------------------------------------------------------------------------------

    def _read(self, key: Key) -> Token:
        token = self._read_redis(key) if self._redis is not None else self._http("/wechat/token", key)
        self._store(key, token)
        return token

    def _force(self, key: Key, old: str) -> Token:
        if self.url is not None:
            return self._http("/wechat/token/forcerefresh", key, old=old)
        # Redis only: nobody here may ask WeChat; the key may have been replaced meanwhile.
        token = self._read_redis(key)
        if token.value == old:
            raise TokenServerError(f"{_what(key)}: Redis still holds the rejected value, and only the server can replace it (give TokenClient its url= and secret=)")
        return token

    def _http(self, path: str, key: Key, old: str | None = None) -> Token:
        type_, account, appid = key
        params = {"type": type_}
        if account is not None:
            params["account"] = account
        if appid is not None:
            params["appid"] = appid
        if old is not None:
            params["old"] = old
        assert self.url is not None and self._secret is not None
        request = urllib.request.Request(
            f"{self.url}{path}?{urllib.parse.urlencode(params)}",
            headers={"X-Token-Secret": self._secret, "Accept": "application/json", "User-Agent": USER_AGENT},
        )
        what = _what(key)
        sent = time.monotonic()
        try:
            with self._opener.open(request, timeout=self.timeout) as answer:
                status, body = answer.status, answer.read(MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as e:
            # Its str and url carry the query (old= is a token): build our own error, unchained.
            with e:
                body = e.read(MAX_ANSWER_BYTES)
            raise _error_answer(e.code, body, e.headers.get("Retry-After"), what) from None
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise TokenServerError(f"token server unreachable for {what}: {reason}") from None
        if status != 200:
            raise _error_answer(status, body, None, what)
        try:
            answer_json = json.loads(body)
            value = next(v for k, v in answer_json.items() if k != "expires_in" and isinstance(v, str) and v)
            expires_in = float(answer_json["expires_in"])
        except (ValueError, TypeError, AttributeError, KeyError, StopIteration):
            # Never the body itself: it may hold the value.
            raise TokenServerError(f"token server answered {what} with an unreadable body ({len(body)} bytes)", status=status) from None
        return Token(value, sent + expires_in, sent)

    def _connect_redis(self, url: str) -> Any:
        try:
            import redis
        except ImportError:
            raise ImportError("Redis mode needs the redis package: pip install 'wechat-token-client[redis]'") from None
        return redis.Redis.from_url(url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout)

    def _read_redis(self, key: Key) -> Token:
        type_, account, _ = key
        name = self.prefix + (type_ if account is None else f"{account}.{type_}")
        sent = time.monotonic()
        try:
            # GET and PTTL in one MULTI: the life belongs to this value, not to a successor.
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(name)
            pipe.pttl(name)
            value, pttl = pipe.execute()
        except Exception as e:  # redis.RedisError, OSError: whatever the client raises
            raise TokenServerError(f"Redis unreachable for key {name!r}: {type(e).__name__}: {e}") from None
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not value or pttl is None or pttl <= 0:
            # -2: no such key; -1: no TTL, which the server never writes: not trusted.
            raise TokenServerError(f"no value in Redis under key {name!r} (none stored, or another prefix or account)")
        return Token(value, sent + pttl / 1000.0, sent)


def _what(key: Key) -> str:
    type_, account, appid = key
    return f"type={type_}" + (f" account={account}" if account is not None else "") + (f" appid={appid}" if appid is not None else "")


def _error_answer(status: int, body: bytes, retry_after: str | None, what: str) -> TokenServerError:
    """The server's JSON error ``{"errcode": status, "errmsg": reason}`` as an exception."""
    errcode = errmsg = None
    try:
        parsed = json.loads(body)
        if isinstance(parsed, dict):
            errcode = parsed.get("errcode") if isinstance(parsed.get("errcode"), int) else None
            errmsg = str(parsed["errmsg"])[:200] if "errmsg" in parsed else None
    except ValueError:
        pass  # nginx's HTML 502 and the like: the status says enough
    try:
        retry = float(retry_after) if retry_after is not None else None
    except ValueError:
        retry = None
    message = f"token server answered {status} for {what}" + (f": {errmsg}" if errmsg else "")
    return TokenServerError(message, status=status, errcode=errcode, errmsg=errmsg, retry_after=retry)
