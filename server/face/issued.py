"""Which account issued a token: the face accepts only tokens this server handed out.

A token is accepted for an account when it is that account's current value, or the value the
current one replaced less than ``refresh.overlap`` seconds ago (WeChat keeps that one valid
for 5 minutes, and an SDK may still hold it).  The previous value is remembered per process
(``SourceState.previous``, set whenever this process adopts a newer value): an instance that
never held it answers 40001, and the SDK fetches the token again, which costs nothing.

Comparisons are constant-time and go over every accepted value of every account, so the time
taken tells nothing about which account, or how much of a token, matched.
"""

from __future__ import annotations

import asyncio
import hmac
import time

from server.accounts import TOKEN, Account, Accounts
from server.refresher import Refresher
from server.state import SourceState

#: WeChat asks callers to reserve 512 bytes for a token; anything longer was not issued here.
MAX_TOKEN_BYTES = 512


def _encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


class Issued:
    """Looks up the account a token belongs to (see the module docstring)."""

    def __init__(self, refresher: Refresher, accounts: Accounts, overlap: float) -> None:
        self.refresher = refresher
        self.accounts = accounts
        self.overlap = overlap  # seconds

    def accepted(self, state: SourceState, now: float) -> list[str]:
        """The values of one token source an SDK may present now: current, and previous
        while its overlap lasts (monotonic ``now``)."""
        out = []
        if state.entry is not None and state.entry.remaining() > 0:
            out.append(state.entry.value)
        prev = state.previous
        if prev is not None and now < min(prev.expires_at, state.replaced_at + self.overlap):
            out.append(prev.value)
        return out

    def _match(self, token: bytes) -> Account | None:
        now = time.monotonic()
        found = None
        for account in self.accounts.by_name.values():
            state = self.refresher.states.get(account.sources[TOKEN])
            if state is None:
                continue
            for value in self.accepted(state, now):
                if hmac.compare_digest(_encode(value), token) and found is None:
                    found = account
        return found

    async def owner(self, token: str) -> Account | None:
        """The account that ``token`` was issued for, or None.  Never calls upstream.

        Memory first; on a miss every account's current value is read from Redis once (reads
        are shared), since another instance may have stored a value this one has not read yet.
        """
        raw = _encode(token)
        if not raw or len(raw) > MAX_TOKEN_BYTES:
            return None
        found = self._match(raw)
        if found is None and self.accounts:
            sources = [a.sources[TOKEN] for a in self.accounts.by_name.values()]
            await asyncio.gather(*(self.refresher.current(s) for s in sources), return_exceptions=True)
            found = self._match(raw)
        return found
