"""The one exception type of the client."""

from __future__ import annotations

from typing import Any, Dict, Optional


class TokenServerError(Exception):
    """The token server (or its Redis) gave no value.

    ``status``: the HTTP status it answered (None when it was not reached, or in Redis mode);
    ``errcode`` / ``errmsg``: its JSON error ``{"errcode": <status>, "errmsg": "<reason>"}``
    (None when the answer was not that JSON); ``retry_after``: seconds from ``Retry-After``
    (429, and 503 while the server backs off), else None.  Neither ``str()`` nor ``repr()`` ever
    holds the request secret or a value: only the type, account, status and the server's reason.
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        errcode: Optional[int] = None,
        errmsg: Optional[str] = None,
        retry_after: Optional[float] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.errcode = errcode
        self.errmsg = errmsg
        self.retry_after = retry_after

    @property
    def error(self) -> Optional[Dict[str, Any]]:
        """The server's JSON error as it sent it, or None."""
        if self.errcode is None and self.errmsg is None:
            return None
        return {"errcode": self.errcode, "errmsg": self.errmsg}

    def copy(self) -> TokenServerError:
        """The same error as a new object (each waiting thread raises its own)."""
        return TokenServerError(self.message, status=self.status, errcode=self.errcode, errmsg=self.errmsg, retry_after=self.retry_after)

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"TokenServerError({self.message!r}, status={self.status!r}, errcode={self.errcode!r}, errmsg={self.errmsg!r})"
