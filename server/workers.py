"""``--workers N``: N server processes on one listening socket, under a small supervisor.

The parent binds the port (and starts the embedded Redis, if any) once, then forks N
children before any event loop, thread or Redis connection exists.  Each child runs the
whole server (server.app.serve) on the shared socket: its own refresher takes part in the
Redis lock as a separate instance would (its ``host:pid`` is its name), so there is still
exactly one upstream call per rotation whatever N is, and the kernel spreads connections
over the children.

The parent only supervises:

- SIGTERM / SIGINT: passed to every child, then it waits for all of them (each finishes
  its requests and fetches, as a single process does) and exits 0;
- SIGHUP: passed to every child; each reloads the config file (server.ops.reload);
- a child that dies without being asked (a crash, the OOM killer) is replaced after a
  short pause, growing to at most ``MAX_RESTART_DELAY`` while children keep dying young.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable

from server.embedded_redis import die_with_parent

logger = logging.getLogger(__name__)

MIN_LIFE = 10.0  # seconds: a child that dies younger than this doubles the restart delay
MAX_RESTART_DELAY = 30.0  # seconds


class Supervisor:
    """Forks ``n`` children running ``child(index)`` (returns the exit code) and keeps them up."""

    def __init__(self, n: int, child: Callable[[int], int]) -> None:
        self.n = n
        self.child = child
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (index, monotonic start)
        self.stopping = False
        self._delay = 0.5

    def run(self) -> int:
        """Run until SIGTERM/SIGINT and every child has exited; returns 0."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._pass_on)
        for index in range(self.n):
            self._spawn(index)
        logger.info("supervisor %d: %d workers started (pids %s)", os.getpid(), self.n, " ".join(map(str, self.children)))
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0)  # signals are handled (and passed on) meanwhile
            except ChildProcessError:
                break
            self._exited(pid, status)
        logger.info("supervisor %d: all workers stopped", os.getpid())
        return 0

    def _pass_on(self, signum: int, frame: object) -> None:
        """The signal handler (Python runs it in the main thread, between two waits)."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        logger.info("supervisor %d: %s: passing it to %d workers", os.getpid(), signal.Signals(signum).name, len(self.children))
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    def _exited(self, pid: int, status: int) -> None:
        found = self.children.pop(pid, None)
        if found is None:
            return
        index, started = found
        code = os.waitstatus_to_exitcode(status)
        if self.stopping:
            logger.info("supervisor: worker %d (pid %d) stopped (exit %d)", index, pid, code)
            return
        lived = time.monotonic() - started
        self._delay = min(self._delay * 2, MAX_RESTART_DELAY) if lived < MIN_LIFE else 0.5
        how = f"signal {-code}" if code < 0 else f"exit {code}"
        logger.error("supervisor: worker %d (pid %d) died (%s) after %.0fs; starting another in %.1fs", index, pid, how, lived, self._delay)
        deadline = time.monotonic() + self._delay
        while time.monotonic() < deadline and not self.stopping:
            time.sleep(0.05)
        if not self.stopping:
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: its own signal handling (server.app.serve installs it)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve's handler: never fatal
            die_with_parent()  # a SIGKILLed supervisor must not leave workers holding the port
            code = 1
            try:
                code = self.child(index)
            except BaseException:
                logger.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())
