"""Lost answers: a call that got no answer (a timeout, a dropped connection, a fetch
cancelled at shutdown) may have made WeChat issue a token nobody received.

On the classic endpoint (and a forced stable_token call) that retires all but the one
before it, so after a lost answer:

- the stored token's life is cut to WeChat's overlap (``refresh.overlap``): it may now be
  WeChat's "previous" token, valid a few more minutes only (:meth:`LostAnswers.cut`);
- the next call waits twice as long for its answer, up to 2**MAX_TIMEOUT_GROWTH times
  ``refresh.timeout``: a WeChat slower than the timeout issues a token on every call we give
  up on, so the retry must wait longer than the call it lost; the doubling that got an
  answer is remembered (``NAME:slow``) so the next rotation waits as long at once;
- after two lost answers in a row WeChat has probably issued two tokens we never saw, which
  kills the stored one: it is checked with ``getcallbackip`` (no quota) and dropped when
  WeChat rejects it (:meth:`LostAnswers.verify`): a 503 is better than a dead token.

The counts are the instances' (``NAME:lost`` in Redis) and this process's own, whichever is
higher, since Redis may lose its count with its data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping

from redis.exceptions import RedisError

from server.config import RefreshConfig
from server.mirror import Mirror
from server.sources import Source
from server.state import SourceState, Want
from server.store import Entry, Snapshot, Store
from server.upstream import Upstream

logger = logging.getLogger(__name__)

MAX_TIMEOUT_GROWTH = 3  # after lost answers a call waits up to 2**3 times refresh.timeout


class LostAnswers:
    """What the fetcher does about answers it lost (see the module docstring)."""

    def __init__(
        self,
        sources: Mapping[str, Source],
        store: Store,
        upstream: Upstream,
        mirror: Mirror,
        states: dict[str, SourceState],
        cfg: RefreshConfig,
    ) -> None:
        self.sources = sources
        self.store = store
        self.upstream = upstream
        self.mirror = mirror
        self.states = states
        self.cfg = cfg

    def lost(self, name: str, snap: Snapshot | None) -> int:
        """Answers lost in a row: the instances' count in Redis, or this process's if higher
        (Redis may have lost its count with its data)."""
        return max(snap.lost if snap is not None else 0, self.states[name].lost_answers)

    def timeout(self, name: str, snap: Snapshot | None) -> float:
        """Seconds to wait for an answer: ``refresh.timeout``, doubled for each answer lost in a
        row (up to 2**MAX_TIMEOUT_GROWTH times), or as often as the last answered call needed:
        a WeChat slower than the timeout issues a token on every call we give up on, so the
        retry must wait longer than the call it lost, and the next rotation as long at once."""
        doublings = min(max(self.lost(name, snap), snap.slow if snap is not None else 0), MAX_TIMEOUT_GROWTH)
        return self.cfg.timeout * 2**doublings

    async def learn(self, name: str, timeout: float, took: float, known: int) -> None:
        """After an answered call: keep the longer timeout while WeChat needs it, forget it
        once an answer comes within ``refresh.timeout``."""
        doublings = 0 if took <= self.cfg.timeout else round(math.log2(timeout / self.cfg.timeout))
        if doublings != known:
            try:
                await self.store.set_slow(name, doublings)
            except RedisError:
                pass

    @staticmethod
    def lease(timeout: float) -> float:
        """Seconds the lock is taken for: it outlives the calls made under it (it is renewed
        before a second call)."""
        return 2 * timeout + 5

    def rotates(self, name: str, want: Want) -> bool:
        return self.sources[name].rotates(want.force)

    async def cut(self, name: str) -> None:
        """WeChat may have issued a value we never saw, leaving the stored one 5 minutes
        (its "previous" token): shorten its life, in Redis and memory, so it is refreshed in time."""
        entry = self.states[name].entry
        if entry is None:
            return
        try:
            if await self.store.cap_life(name, entry.value, self.cfg.overlap):
                await self.mirror.read_now(name)
                logger.warning("source %s: an answer was lost; the stored value may be WeChat's previous one: its life is cut to %.0fs", name, self.cfg.overlap)
        except RedisError:
            if entry.remaining() > self.cfg.overlap:
                self.states[name].entry = dataclasses.replace(entry, expires_at=time.monotonic() + self.cfg.overlap)

    async def verify(self, name: str, entry: Entry) -> None:
        """After two lost answers in a row WeChat has probably issued two values we never saw,
        which kills the stored one.  Ask WeChat (``getcallbackip``: no quota) and drop the
        stored value when it is rejected: a 503 is better than a dead token."""
        request = self.sources[name].check_request(entry.value)
        if request is None:
            return
        alive = await self.upstream.check(request, self.cfg.timeout)
        if alive is False:
            logger.error("source %s: WeChat rejects the stored value after lost answers; dropping it until a new one arrives", name)
            await self.store.drop(name, entry.value)
            await self.mirror.read_now(name)
