"""Every token and ticket the simulator handed out, and the rules that make one die.

Shared by the official-account, mini-program and WeCom endpoints, which differ in how often they
issue a token (each call, or once per life) but not in how a token stops working.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from server.sandbox.common import TOKEN_SHAPE, ApiError, new_value

ChainKey = tuple[str, str, str]  # (kind, appid or corpid, agentid or "")


@dataclasses.dataclass
class IssuedToken:
    kind: str  # "token" (/cgi-bin/token), "stable" or "corp"
    owner: str  # appid or corpid
    agentid: str  # the WeCom app of a "corp" token; "" otherwise
    expires_at: float  # clock seconds
    # Clock seconds after which the token is "not latest" (40001); -inf once superseded twice.
    valid_until: float


class Ledger:
    """Issued tokens and tickets. ``expires_in`` (seconds) is the life of each one; ``overlap``
    the seconds a superseded token keeps working; both may be changed between calls."""

    def __init__(self, *, expires_in: int, overlap: float, clock: Callable[[], float]) -> None:
        self.expires_in = expires_in
        self.overlap = overlap
        self.clock = clock
        self.tokens: dict[str, IssuedToken] = {}
        self.tickets: set[str] = set()
        # Other values a leak check must know (web-login tokens); never valid as access_token.
        self.other_values: set[str] = set()
        self.chains: dict[ChainKey, list[str]] = {}  # -> [previous, newest]

    def reset(self) -> None:
        self.tokens.clear()
        self.tickets.clear()
        self.other_values.clear()
        self.chains.clear()

    def values(self) -> set[str]:
        """Every token and ticket value handed out since the last reset."""
        return set(self.tokens) | self.tickets | self.other_values

    def status(self, token: str) -> int:
        """0 if ``token`` is valid now, 42001 if expired, 40001 if unknown or superseded."""
        entry = self.tokens.get(token)
        if entry is None:
            return 40001
        now = self.clock()
        # A superseded token dies as "not latest" unless its overlap already ran to its expiry.
        if entry.valid_until < entry.expires_at and now >= entry.valid_until:
            return 40001
        if now >= entry.expires_at:
            return 42001
        return 0

    def check(self, access_token: str | None, kinds: frozenset[str]) -> IssuedToken:
        """The entry of a valid ``access_token`` of one of ``kinds``, or WeChat's ApiError.

        41001 when missing, 40014 when malformed, 42001 when expired, 40001 when unknown,
        superseded or of another kind (an official-account token sent to a WeCom-only call).
        """
        if not access_token:
            raise ApiError(41001, "access_token missing")
        if not TOKEN_SHAPE.fullmatch(access_token):
            raise ApiError(40014, "invalid access_token")
        status = self.status(access_token)
        entry = self.tokens.get(access_token)
        if status == 0 and entry is not None and entry.kind in kinds:
            return entry
        if status == 42001:
            raise ApiError(42001, "access_token expired")
        raise ApiError(40001, "invalid credential, access_token is invalid or not latest")

    def newest(self, kind: str, owner: str, agentid: str = "") -> str | None:
        chain = self.chains.get((kind, owner, agentid))
        return chain[-1] if chain else None

    def new_value(self) -> str:
        """A fresh token or ticket, never equal to one handed out before (since reset)."""
        while True:
            value = new_value()
            if value not in self.tokens and value not in self.tickets \
                    and value not in self.other_values:
                return value

    def new_ticket(self) -> str:
        ticket = self.new_value()
        self.tickets.add(ticket)
        return ticket

    def rotate(self, kind: str, owner: str, *, overlap: float | None, agentid: str = "") -> str:
        """Issue a new newest token of (kind, owner, agentid).

        The one before the previous newest dies at once; the previous newest stays valid for
        ``overlap`` more seconds (None: until its own expiry), never beyond its expiry.
        """
        now = self.clock()
        chain = self.chains.setdefault((kind, owner, agentid), [])
        if len(chain) == 2:
            self.tokens[chain.pop(0)].valid_until = -math.inf
        if chain and overlap is not None:
            previous = self.tokens[chain[0]]
            previous.valid_until = min(previous.expires_at, now + overlap)
        token = self.new_value()
        expires_at = now + self.expires_in
        self.tokens[token] = IssuedToken(kind, owner, agentid, expires_at, expires_at)
        chain.append(token)
        return token

    def remaining(self, token: str) -> float:
        """Seconds of life ``token`` has left (negative once expired)."""
        return self.tokens[token].expires_at - self.clock()
