"""wechatpy (1.8) with its token from the token server: a session storage, and the client that
never fetches a token itself.

    from wechat_token_client import TokenClient
    from wechat_token_client.wechatpy import TokenServerSession, WeChatClient

    tokens = TokenClient("http://127.0.0.1:12123", secret=os.environ["TOKEN_SERVER_SECRET"])
    client = WeChatClient(APPID, None, session=TokenServerSession(tokens, account="shop"))
    client.message.send_text(openid, "hi")

Why a subclass as well as the session.  wechatpy asks its session for ``APPID_access_token``
and uses what it gets without fetching, as long as it never fetched itself (``expires_at``
stays None); the session answers from the server, so an ordinary call costs no fetch.  But on
40001, 40014 or 42001 wechatpy's ``_handle_result`` calls ``fetch_access_token()``, which asks
WeChat's ``/cgi-bin/token`` itself with the AppSecret (a new token, which kills the one every
other system holds), stores it with ``session.set`` and retries; if the retry is rejected too,
it does it again, without limit.  A session is told only after that fetch, too late.  So this
``WeChatClient`` overrides ``fetch_access_token`` to ask the token server instead
(``forcerefresh`` with ``old=`` the token the rejected call carried: one rotation for any crowd)
and allows that once per API call: a retry that is rejected again is raised as wechatpy's
``WeChatClientException`` with WeChat's errcode, instead of looping.

With wechatpy's own ``WeChatClient`` and this session, pass ``auto_retry=False``: a 40001 is then
raised to you, and ``session.refresh_after_rejection(token)`` gives the value to retry with.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Optional, Tuple

import wechatpy
from wechatpy.exceptions import WeChatClientException
from wechatpy.session import SessionStorage

from wechat_token_client.client import Token, TokenClient

logger = logging.getLogger(__name__)

#: wechatpy's session key suffixes (after ``APPID``) -> the server's type.  The ticket keys
#: come with an ``..._expires_at`` companion (unix seconds) that wechatpy compares with time.time().
MANAGED = {"_access_token": "access_token", "_jsapi_ticket": "ticket", "_jsapi_card_ticket": "wx_card_ticket"}
EXPIRES_AT = "_expires_at"
#: The errcodes wechatpy answers with a new token and a retry.
REJECTED = frozenset({40001, 40014, 42001})


class TokenServerSession(SessionStorage):
    """A wechatpy session storage whose access_token and JS-SDK tickets come from the token server.

    ``tokens``: the :class:`TokenClient`; ``account`` / ``appid``: which account of the server
    (as in :meth:`TokenClient.get`; neither: the server's default account).  One session per
    wechatpy client: the session binds to ``appid``, or to the appid of the first key it serves,
    and refuses a key of another (it would hand one account's token to another).

    ``get`` answers ``APPID_access_token``, ``APPID_jsapi_ticket`` and ``APPID_jsapi_card_ticket``
    (and their ``..._expires_at``) from the server; it never returns None for them (it raises
    :class:`TokenServerError`, so wechatpy never falls back to fetching).  ``set`` on them is
    ignored (the server owns them); ``delete`` forgets the cached value.  Other keys are kept
    in memory, as wechatpy's ``MemoryStorage`` would.
    """

    def __init__(self, tokens: TokenClient, account: Optional[str] = None, *, appid: Optional[str] = None) -> None:
        self.tokens = tokens
        self.account = account
        self.appid = appid  # the server's appid argument, and the wechatpy appid this session serves
        self._bound: Optional[str] = appid
        self._lock = threading.Lock()
        self._other: Dict[str, Tuple[Any, Optional[float]]] = {}  # key -> (value, monotonic expiry)

    def __repr__(self) -> str:
        return f"TokenServerSession({self.tokens!r}, account={self.account!r}, appid={self.appid!r})"

    def _managed(self, key: str) -> Optional[Tuple[str, bool]]:
        """(type, is the expires_at companion) for a key this session answers, else None."""
        expires = key.endswith(EXPIRES_AT)
        base = key[: -len(EXPIRES_AT)] if expires else key
        for suffix, type_ in MANAGED.items():
            if base.endswith(suffix) and (not expires or type_ != "access_token"):
                owner = base[: -len(suffix)]
                with self._lock:
                    if self._bound is None:
                        self._bound = owner
                if owner != self._bound:
                    raise ValueError(f"this TokenServerSession serves appid {self._bound}, not {owner}: use one session per WeChatClient")
                return type_, expires
        return None

    def token(self, type_: str = "access_token") -> Token:
        """The server's value of ``type_`` for this session's account, with its life."""
        return self.tokens.get_token(type_, self.account, appid=self.appid)

    def refresh_after_rejection(self, value: str, type_: str = "access_token") -> str:
        """See :meth:`TokenClient.refresh_after_rejection`, for this session's account."""
        return self.tokens.refresh_after_rejection(value, type_, self.account, appid=self.appid)

    def get(self, key: str, default: Any = None) -> Any:
        managed = self._managed(key)
        if managed is None:
            with self._lock:
                value, until = self._other.get(key, (default, None))
                if until is not None and time.monotonic() >= until:
                    del self._other[key]
                    return default
                return value
        type_, expires = managed
        token = self.token(type_)
        # wechatpy compares the ticket's expiry with time.time(): the wall clock, as it does.
        return int(time.time() + token.remaining()) if expires else token.value

    def set(self, key: str, value: Any, ttl: Optional[float] = None) -> None:
        managed = self._managed(key)
        if managed is None:
            with self._lock:
                self._other[key] = (value, time.monotonic() + ttl if ttl else None)
        elif managed == ("access_token", False):
            # wechatpy's own WeChatClient stores a token it fetched from WeChat itself.
            logger.warning("wechatpy stored an access_token it fetched itself: use wechat_token_client.wechatpy.WeChatClient, or auto_retry=False")

    def delete(self, key: str) -> None:
        managed = self._managed(key)
        if managed is None:
            with self._lock:
                self._other.pop(key, None)
        else:
            self.tokens.invalidate(managed[0], self.account, appid=self.appid)


class WeChatClient(wechatpy.WeChatClient):
    """wechatpy's ``WeChatClient`` whose access_token always comes from the token server.

    Same arguments as wechatpy's; ``session`` must be a :class:`TokenServerSession`,
    ``secret`` is never used (pass None: nothing here asks WeChat for a token) and
    ``access_token`` is refused (the server's token is the only one).  On 40001,
    40014 or 42001: one ``forcerefresh`` with ``old=`` the rejected token and one retry per API
    call; a retry rejected again raises ``WeChatClientException`` (see the module docstring).
    """

    def __init__(self, appid: str, secret: Optional[str] = None, access_token: Optional[str] = None,
                 session: Optional[TokenServerSession] = None, timeout: Optional[float] = None, auto_retry: bool = True) -> None:
        if not isinstance(session, TokenServerSession):
            raise TypeError("session= must be a TokenServerSession (the token comes from the token server)")
        if access_token is not None:
            raise ValueError("access_token= is not used: the token comes from the token server")
        super().__init__(appid, secret, access_token=access_token, session=session, timeout=timeout, auto_retry=auto_retry)
        self._call = threading.local()  # per thread: the API call in progress and its rejection

    def _request(self, method: str, url_or_endpoint: str, **kwargs: Any) -> Any:
        call = self._call
        outer = not getattr(call, "active", False)
        if outer:  # wechatpy's retry re-enters _request: only the outer call starts afresh
            call.active, call.rejected, call.refreshed = True, None, False
        try:
            return super()._request(method, url_or_endpoint, **kwargs)
        finally:
            if outer:
                call.active, call.rejected = False, None

    def _handle_result(self, res: Any, method: Any = None, url: Any = None, result_processor: Any = None, **kwargs: Any) -> Any:
        result = res if isinstance(res, dict) else self._decode_result(res)
        errcode = _errcode(result)
        if errcode in REJECTED:
            call = self._call
            if getattr(call, "refreshed", False):
                # The retry after our one refresh was rejected too: stop here (wechatpy would loop).
                raise WeChatClientException(errcode, result.get("errmsg", errcode), client=self,
                                            request=getattr(res, "request", None), response=None if isinstance(res, dict) else res)
            params = kwargs.get("params")
            call.rejected = params.get("access_token") if isinstance(params, dict) else None
        return super()._handle_result(res, method, url, result_processor, **kwargs)

    def fetch_access_token(self) -> Dict[str, Any]:
        """The token server's token (never WeChat's ``/cgi-bin/token``); after a rejection,
        its replacement (``forcerefresh`` with ``old=`` the rejected token)."""
        call = self._call
        rejected = getattr(call, "rejected", None)
        session: TokenServerSession = self.session
        if getattr(call, "active", False):
            # wechatpy retries after this: once per API call, whether or not we could rotate
            # (a call whose token we could not see is retried with the current one).
            call.rejected, call.refreshed = None, True
        if rejected:
            session.refresh_after_rejection(rejected)
        token = session.token()
        return {"access_token": token.value, "expires_in": int(token.remaining())}


def _errcode(result: Any) -> int:
    if not isinstance(result, dict):
        return 0
    # Device APIs answer inside base_resp (wechatpy merges it the same way).
    inner = result.get("base_resp")
    raw = (inner if isinstance(inner, dict) else result).get("errcode", 0)
    try:
        return int(raw or 0)
    except (TypeError, ValueError):
        return 0
