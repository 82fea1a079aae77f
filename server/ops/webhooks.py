"""Webhooks: each event of a source POSTed, signed, to the URLs configured for it, once across instances.

Configured as ``notify: [{url, secret, include_value}]`` under an account (every event of its
sources) or under a source declared by hand (server.config.NotifyConfig).  For each event
(server.ops.events) of such a source, each of its hooks gets one *delivery*:

1. **Claim.**  Every instance hears the event; each tries
   ``SET <prefix>wechat-token:webhook:<event id>:<hook id> <host:pid> NX EX CLAIM_TTL`` and only
   the one that sets it sends.  The hook id is a digest of the URL, so instances agree on the key
   while their configs agree on the URL.  An instance that already has ``max_pending``
   deliveries does not claim (another one can).
2. **Body.**  The event's JSON (``Event.as_dict``, compact UTF-8).  For a hook with
   ``include_value: true`` and a ``rotated`` event, plus ``"value"``: the plain key, read once
   right after the claim; null when Redis already holds a newer version (whose own event
   follows), no value, or cannot be read.
3. **POST** with ``Content-Type: application/json``, ``X-Signature: sha256=<hex HMAC-SHA256 of
   the exact body, keyed with the hook's secret>``, ``X-Webhook-Id`` (the event's id) and
   ``X-Webhook-Attempt`` (1, 2, ...).  A 2xx answer is a delivery.  Anything else (another
   status, no answer within ``timeout``, a refused connection, a redirect: never followed) is
   retried after 1, 2, 4 ... seconds (at most ``max_delay``) while the next try starts within
   ``retry_for`` seconds of the first: with the defaults, 10 tries over about 5 minutes.

**Once across instances is at most once.**  A claimed delivery is sent by its claimer alone
(which repeats a try whose answer it did not get: receivers may see an id twice).  If
that instance dies, or stops before the receiver accepted (see :meth:`Webhooks.stop`), nobody
sends it.  The claim is not released at shutdown: the other instances heard the event when it
was published, lost the claim and forgot it, so a released claim would find no taker (handing
deliveries over needs an outbox in Redis; not built).  Receivers treat an event as a hint:
de-duplicate on ``id`` and re-read the value, or ignore a ``version`` at or below the last seen.

**Never in the refresher's way.**  The listener only spawns a task per delivery and returns;
the POSTs go through an HTTP client of their own (``max_concurrent`` at once, ``timeout``
seconds each), and at most ``max_pending`` deliveries are kept per process.

Logs name the hook by its URL without user info or query, and never carry the secret or a
value; /metrics counts deliveries, retries and failures (server.metrics).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest

from server import __version__
from server.accounts import Accounts
from server.config import Config, NotifyConfig
from server.metrics import Metrics
from server.ops.events import Event
from server.redact import printable
from server.store import Keys

logger = logging.getLogger(__name__)

#: seconds for one POST, connection included
TIMEOUT = 10.0
#: seconds before the first retry; each next one waits twice as long, at most MAX_DELAY
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
#: seconds after the first try within which a retry may start; after that the delivery fails
RETRY_FOR = 300.0
#: seconds a claim lives: longer than the retry window, so that no instance hearing the event
#: late can claim it again while its claimer still tries (then Redis forgets it)
CLAIM_TTL = int(RETRY_FOR) + 3600
#: POSTs under way at once per process (the others wait their turn)
MAX_CONCURRENT = 10
#: claims and value reads at once per process: the store's connections stay the refresher's
MAX_REDIS = 4
#: deliveries a process keeps (claimed, sending or waiting to retry); past it, events are not
#: claimed here, so another instance may take them
MAX_PENDING = 1000
#: seconds a POST under way gets at shutdown before it is dropped
SHUTDOWN_WAIT = 5.0

#: event ids are ours (hex); anything else did not come from a store script
_EVENT_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")


def sign(secret: str | bytes, body: bytes) -> str:
    """The ``X-Signature`` value of ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def shown_url(url: str) -> str:
    """``url`` as logs may show it: no user info, no query, no fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass(frozen=True)
class Hook:
    """One configured webhook, ready to send (see the module docstring)."""

    url: str
    secret: bytes = field(repr=False)
    include_value: bool
    id: str  # a digest of the URL: part of the claim key, the same on every instance
    shown: str  # the URL as logs show it

    @classmethod
    def of(cls, cfg: NotifyConfig) -> Hook:
        url = cfg.url.strip()
        return cls(url, cfg.secret.encode("utf-8"), cfg.include_value, hashlib.sha256(url.encode("utf-8")).hexdigest()[:16], shown_url(url))


def hooks_by_source(cfg: Config) -> dict[str, tuple[Hook, ...]]:
    """Source -> its hooks: an account's for each of its sources, a hand-declared source's own."""
    out: dict[str, tuple[Hook, ...]] = {}
    for account in Accounts.from_config(cfg).by_name.values():
        declared = cfg.accounts[account.name].notify
        if declared:
            for source in account.sources.values():
                out[source] = tuple(Hook.of(h) for h in declared)
    for name, src in cfg.sources.items():
        if src.notify:
            out[name] = tuple(Hook.of(h) for h in src.notify)
    return out


def _discard(chunk: bytes) -> None:
    """A receiver's answer body is not read (nor kept: it could be of any size)."""


class Webhooks:
    """The deliveries of one process (see the module docstring).

    ``redis``: the store's client; ``prefix``: ``redis.prefix``; ``instance``: host:pid, the
    value of a claim (``redis-cli GET`` shows who sends); ``metrics``: where the counts go.
    The keyword arguments are the module's constants (seconds and counts), for tests.
    :meth:`configure` takes the hooks of a (reloaded) config; :meth:`on_event` is the
    Subscriber's listener; :meth:`stop` ends it all.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        instance: str,
        metrics: Metrics,
        *,
        timeout: float = TIMEOUT,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        retry_for: float = RETRY_FOR,
        max_concurrent: int = MAX_CONCURRENT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = Keys.of(redis, prefix)  # a source's key names (tagged on a cluster)
        self.instance = instance
        self.metrics = metrics
        self.timeout = timeout
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.retry_for = retry_for
        self.claim_ttl = max(CLAIM_TTL, int(retry_for) + 3600)
        self.max_pending = max_pending
        self.hooks: dict[str, tuple[Hook, ...]] = {}
        self._sending = asyncio.Semaphore(max_concurrent)
        self._redis_slots = asyncio.Semaphore(MAX_REDIS)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        # A client of our own: the refresher's (server.upstream) never waits behind a slow receiver.
        self.client = AsyncHTTPClient(force_instance=True, max_clients=max_concurrent)

    def __repr__(self) -> str:
        return f"Webhooks({sum(len(h) for h in self.hooks.values())} hooks, {len(self._tasks)} pending)"

    def configure(self, cfg: Config) -> None:
        """Take the hooks of ``cfg`` (at start and at each reload).  Deliveries under way
        keep the hook they started with; the next event uses the new ones."""
        self.hooks = hooks_by_source(cfg)

    async def on_event(self, event: Event) -> None:
        """The Subscriber's listener: spawn one delivery per hook of the event's source.
        Returns at once (no I/O here: listeners run one after the other)."""
        hooks = self.hooks.get(event.source, ())
        if not hooks or self._stopping.is_set():
            return
        if not _EVENT_ID_RE.fullmatch(event.id):
            logger.warning("webhooks: ignored an event of %s with a malformed id", event.source)
            return
        for hook in hooks:
            if len(self._tasks) >= self.max_pending:
                self.metrics.webhook_failed.labels(event.source, "overflow").inc()
                logger.warning("webhook %s: %d deliveries pending here; %s event %s of %s not claimed by this instance",
                               hook.shown, len(self._tasks), event.event, event.id, event.source)
                continue
            task = asyncio.ensure_future(self._deliver(event, hook))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self, wait: float = SHUTDOWN_WAIT) -> None:
        """Stop delivering: no new delivery starts; one waiting for its next try makes it at
        once; what is unfinished after ``wait`` seconds is dropped (logged, counted as
        ``shutdown``).  Claims are kept (see the module docstring); an event heard after this
        is not claimed here, so another instance still running sends it.  Safe to call twice."""
        self._stopping.set()
        tasks = set(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=max(0.0, wait))
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        self.client.close()

    # --- one delivery -------------------------------------------------------------------

    async def _deliver(self, event: Event, hook: Hook) -> None:
        what = f"{event.event} event {event.id} of {event.source}"
        try:
            key = f"{self.prefix}wechat-token:webhook:{event.id}:{hook.id}"
            try:
                async with self._redis_slots:
                    claimed = await self.redis.set(key, self.instance, nx=True, ex=self.claim_ttl)
            except RedisError as e:
                self.metrics.webhook_failed.labels(event.source, "redis").inc()
                logger.warning("webhook %s: %s not sent by this instance: cannot claim it (%s)", hook.shown, what, type(e).__name__)
                return
            if not claimed:
                return  # another instance sends it
            try:
                genuine = await self._stored(event)
            except RedisError as e:
                self.metrics.webhook_failed.labels(event.source, "redis").inc()
                logger.warning("webhook %s: %s not sent: cannot check it against Redis (%s)", hook.shown, what, type(e).__name__)
                return
            if not genuine:
                self.metrics.webhook_failed.labels(event.source, "forged").inc()
                logger.warning("webhook %s: %s not sent: its version is above the one Redis holds (a message no stored change made)",
                               hook.shown, what)
                return
            await self._send(event, hook, await self._body(event, hook, what), what)
        except asyncio.CancelledError:
            self.metrics.webhook_failed.labels(event.source, "shutdown").inc()
            logger.warning("webhook %s: %s dropped at shutdown, unfinished (claimed: no other instance sends it)", hook.shown, what)
            raise
        except Exception:  # a bug: logged here, where the task ends, not at garbage collection
            self.metrics.webhook_failed.labels(event.source, "error").inc()
            logger.exception("webhook %s: %s failed", hook.shown, what)

    async def _body(self, event: Event, hook: Hook, what: str) -> bytes:
        data: dict[str, Any] = event.as_dict()
        if hook.include_value and event.event == "rotated":
            try:
                async with self._redis_slots:
                    data["value"] = await self._value(event)
            except RedisError as e:  # claimed: sent all the same, the receiver re-reads
                data["value"] = None
                logger.warning("webhook %s: %s sent with value null: cannot read it (%s)", hook.shown, what, type(e).__name__)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    async def _stored(self, event: Event) -> bool:
        """Whether a stored change can have made ``event``: anyone who can write to Redis can
        publish on the channel, but only the store's scripts raise the version, so an event
        above the stored version is not ours (and would make receivers that follow the README
        ignore every real rotation after it)."""
        async with self._redis_slots:
            version = await self.redis.hget(self.keys.aux(event.source, "meta"), "version")
        try:
            return version is not None and event.version <= int(float(version))
        except ValueError:
            return False

    async def _value(self, event: Event) -> str | None:
        """The value ``event`` announced, from the plain key; None once a newer one (or none) is stored."""
        # One slot on a cluster, where a MULTI goes without (as Store._pipeline).
        async with self.redis.pipeline(transaction=not self.keys.cluster) as pipe:
            pipe.get(self.keys.value(event.source))
            pipe.hget(self.keys.aux(event.source, "meta"), "version")
            value, version = await pipe.execute()
        try:
            same = version is not None and int(float(version)) == event.version
        except ValueError:
            same = False
        return value if same else None

    async def _send(self, event: Event, hook: Hook, body: bytes, what: str) -> None:
        """POST ``body`` until a receiver accepts it or the retry window ends (module docstring)."""
        signature = sign(hook.secret, body)
        deadline = time.monotonic() + self.retry_for
        attempt = 0
        while True:
            attempt += 1
            failure = await self._post(hook, body, signature, event.id, attempt)
            if failure is None:
                self.metrics.webhook_delivered.labels(event.source).inc()
                logger.info("webhook %s: %s delivered (attempt %d)", hook.shown, what, attempt)
                return
            delay = min(self.first_delay * 2 ** (attempt - 1), self.max_delay)
            if self._stopping.is_set() or time.monotonic() + delay > deadline:
                reason = "shutdown" if self._stopping.is_set() else "gave_up"
                self.metrics.webhook_failed.labels(event.source, reason).inc()
                logger.error("webhook %s: %s not delivered after %d attempts (last: %s)%s", hook.shown, what, attempt, failure,
                             "; stopping" if reason == "shutdown" else "")
                return
            self.metrics.webhook_retries.labels(event.source).inc()
            logger.warning("webhook %s: %s, attempt %d failed (%s); next in %.0fs", hook.shown, what, attempt, failure, delay)
            try:
                # Shutdown cuts the wait short: one last try at once, within stop()'s bound.
                await asyncio.wait_for(self._stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass

    async def _post(self, hook: Hook, body: bytes, signature: str, event_id: str, attempt: int) -> str | None:
        """One POST; None when the receiver accepted it (2xx), else what went wrong (for the log)."""
        request = HTTPRequest(
            hook.url,
            method="POST",
            body=body,
            headers={
                "Content-Type": "application/json",
                "X-Signature": signature,
                "X-Webhook-Id": event_id,
                "X-Webhook-Attempt": str(attempt),
            },
            user_agent=f"wechat-token-server/{__version__}",
            connect_timeout=self.timeout,
            request_timeout=self.timeout,
            follow_redirects=False,
            streaming_callback=_discard,
        )
        async with self._sending:
            started = time.monotonic()
            try:
                response = await self.client.fetch(request, raise_error=False)
            except HTTPClientError as e:  # no answer: a timeout, a closed stream
                return f"HTTP {e.code}: {printable(e.message or '', 80)} after {time.monotonic() - started:.1f}s"
            except OSError as e:  # refused, unreachable, TLS
                return f"{type(e).__name__}: {printable(e.strerror or str(e), 80)}"
        if 200 <= response.code < 300:
            return None
        if 300 <= response.code < 400:
            return f"HTTP {response.code} (redirects are not followed)"
        return f"HTTP {response.code}"
