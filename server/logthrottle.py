"""At most a few log lines a second of one kind, whatever a flood of connections does.

A flood makes Tornado and asyncio log the same thing per connection or per loop turn:
``Malformed HTTP message from ...`` for every bad request, an ``Exception in callback``
traceback for every failed accept, our own note for every refused peer.  Each line is
cheap; a million of them fill the disk and bury the one line that says what happened.

:class:`Throttle` is a logging filter that lets ``burst`` records of one kind through per
``period`` seconds and drops the rest; the first record let through after a dropped spell
says how many were dropped.  A kind is the logger, the level, the message *template*
(before its ``%s`` arguments: "Malformed HTTP message from %s" is one kind whatever the
peer) and the exception type.  :func:`install` puts one on the loggers floods reach.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

#: Loggers that write one record per connection or per event-loop turn.
FLOOD_LOGGERS = ("asyncio", "tornado.general", "tornado.application", "server.listener")
#: Distinct kinds remembered at once; past it the table is cleared (kinds are code constants,
#: so this is reached only by messages preformatted with per-connection text).
MAX_KINDS = 1000

_Kind = tuple[str, int, str, str]


class Throttle(logging.Filter):
    """Let through at most ``burst`` records of one kind per ``period`` seconds (see the module docstring).

    ``clock`` (seconds, default ``time.monotonic``) decides the windows.  ``suppressed``
    counts every record dropped so far, for tests and curious operators.
    """

    def __init__(self, burst: int = 3, period: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self.clock = clock
        self.suppressed = 0
        # kind -> [window start (seconds), records let through in it, records dropped in it]
        self._windows: dict[_Kind, list[float]] = {}
        self._lock = threading.Lock()  # logging may be called from threads (executors)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        kind = (record.name, record.levelno, str(record.msg)[:200], exc)
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= self.period:
                dropped = int(window[2]) if window is not None else 0
                if window is None and len(self._windows) >= MAX_KINDS:
                    self._windows.clear()
                self._windows[kind] = [now, 1, 0]
                if dropped:
                    # Appended to the template, before the arguments are applied: no "%" in it.
                    record.msg = f"{record.msg} [{dropped} more like this were suppressed]"
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            self.suppressed += 1
            return False


def install(names: Iterable[str] = FLOOD_LOGGERS, burst: int = 3, period: float = 1.0) -> Callable[[], None]:
    """Put one Throttle on each named logger; returns the function that takes it off again.

    On the loggers, not on the handlers: a handler filter would also thin out the access
    log, whose lines share one template but are each worth keeping.
    """
    throttle = Throttle(burst, period)
    loggers = [logging.getLogger(name) for name in names]
    for lg in loggers:
        lg.addFilter(throttle)

    def remove() -> None:
        for lg in loggers:
            lg.removeFilter(throttle)

    return remove
