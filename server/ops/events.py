"""Rotation events: what each stored change announces on Redis, and one subscriber per process.

Every change of a stored value is published on the channel ``<prefix>wechat-token:events``
(server.store.events_channel) by the script that makes it, so there is exactly one message
per change whichever instance made it.  A message is JSON, never the value itself::

    {"event": "rotated", "source": "access_token", "account": "main",
     "id": "5d0c...", "version": 1764590000123456, "expires_at": 1764597200.125}

``event`` is one of

- ``rotated``: a new value is stored (re-read the key; ``expires_at`` is unix seconds on
  Redis's clock);
- ``blocked`` / ``unblocked``: no instance calls WeChat for this source (a fatal error, the
  daily quota) / calls again.  A quota block that ends by itself at midnight sends no
  ``unblocked``;
- ``dropped``: WeChat rejected the stored value; it is deleted until the next ``rotated``.

``account`` is null for a source declared by hand; ``id`` is unique per message.

:class:`Subscriber` keeps one subscription per process and hands each event to its
listeners (the webhooks, the memory of each value).  Redis Pub/Sub delivers at most once:
a message published while the subscription is down is lost, so listeners are also told
each time the subscription (re)starts and must look at Redis themselves then.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

EVENTS = ("rotated", "blocked", "unblocked", "dropped")


@dataclass(frozen=True)
class Event:
    """One published change (see the module docstring)."""

    event: str
    source: str
    account: str | None
    id: str
    version: int
    expires_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": self.event, "source": self.source, "account": self.account, "id": self.id,
            "version": self.version, "expires_at": self.expires_at,
        }


def parse_event(raw: str | bytes) -> Event | None:
    """The event in a message, or None when it is not one of ours (anyone who can write to
    Redis can publish: nothing here trusts the shape)."""
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("event") not in EVENTS:
            return None
        source, account, id_, version = data["source"], data.get("account"), data["id"], data["version"]
        expires_at = data.get("expires_at")
        if not isinstance(source, str) or not isinstance(id_, str) or not isinstance(version, int) or isinstance(version, bool):
            return None
        if account is not None and not isinstance(account, str):
            return None
        if expires_at is not None and (not isinstance(expires_at, (int, float)) or isinstance(expires_at, bool)):
            return None
        return Event(data["event"], source, account, id_, version, None if expires_at is None else float(expires_at))
    except (ValueError, KeyError, TypeError):
        return None


#: called with each event; an exception is logged and the others still run
Listener = Callable[[Event], Awaitable[None]]
#: called each time the subscription (re)starts: events may have been missed
OnSubscribed = Callable[[], Awaitable[None]]


class Subscriber:
    """One subscription to the events channel, kept up with a reconnect backoff.

    ``start()`` returns once subscribed (or after ``wait`` seconds if Redis is down: the
    subscription keeps trying in the background); ``stop()`` ends it.
    """

    def __init__(self, redis: aioredis.Redis, channel: str, *, retry_max: float = 5.0) -> None:
        self.redis = redis
        self.channel = channel
        self.retry_max = retry_max
        self._listeners: list[Listener] = []
        self._on_subscribed: list[OnSubscribed] = []
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.received = 0  # messages that were events (for /metrics and tests)

    def __repr__(self) -> str:
        return f"Subscriber({self.channel!r})"

    def listen(self, listener: Listener, on_subscribed: OnSubscribed | None = None) -> None:
        self._listeners.append(listener)
        if on_subscribed is not None:
            self._on_subscribed.append(on_subscribed)

    async def start(self, wait: float = 2.0) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        try:
            await asyncio.wait_for(self.subscribed.wait(), wait)
        except asyncio.TimeoutError:
            logger.warning("events: not subscribed to %s yet (redis unreachable); still trying", self.channel)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # cancelled, or whatever ended it: a stop never raises
                pass

    async def _run(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay = 0.1
                for hook in list(self._on_subscribed):
                    await self._call(hook)
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        await self._dispatch(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # Redis gone, or a message the client could not even decode (anyone who can
                # write to Redis can publish bytes that are not UTF-8): start over on a new
                # connection.  Listeners are told at the new subscription, as after any gap.
                if self.subscribed.is_set():
                    logger.warning("events: subscription to %s lost (%s); resubscribing", self.channel, type(e).__name__)
                self.subscribed.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max)
            finally:
                self.subscribed.clear()
                try:
                    await pubsub.aclose()
                except Exception:
                    pass

    async def _dispatch(self, raw: Any) -> None:
        event = parse_event(raw) if isinstance(raw, (str, bytes)) else None
        if event is None:
            logger.debug("events: ignored a message that is not an event on %s", self.channel)
            return
        self.received += 1
        for listener in list(self._listeners):
            await self._call(listener, event)

    @staticmethod
    async def _call(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:
            logger.exception("events: a listener failed")
