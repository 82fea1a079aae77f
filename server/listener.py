"""The HTTP listener: Tornado's HTTPServer, guarded against running out of file descriptors.

Every open connection holds a descriptor until its headers arrive or time out.  A peer
that holds many (half-open connections, a slow trickle of header bytes) can exhaust the
process's limit; then ``accept()`` fails with EMFILE, the listening socket stays readable,
and Tornado's accept handler raises on every turn of the loop: a core spins, each turn logs
a traceback, and ``/healthz`` stops answering.  Three guards, in the order a connection
meets them:

1. **Refused at accept.**  A direct peer that ``admit(ip)`` refuses (see
   :meth:`server.auth.Authenticator.accepts_peer`: not in ``allow_ips``, not a trusted
   proxy, not a probe) is closed before a byte is read: it gets no descriptor to hold.
2. **Header timeout** (``server.header_timeout`` seconds): a connection that has not sent
   a whole request head by then is closed.  Tornado times the wait for the next request's
   head as one span from the end of the previous response, so this is also the keep-alive
   idle limit; there is no separate, longer idle timeout to hide a slow head behind.
3. **EMFILE pauses accepting** for :data:`ACCEPT_PAUSE` seconds instead of retrying at
   once, with one log line per pause (thinned further by :mod:`server.logthrottle`).
   Connections already open keep being served, and their closes free descriptors.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

from server.redact import printable

logger = logging.getLogger(__name__)

#: Seconds without accepting after accept() ran out of descriptors (or kernel memory).
ACCEPT_PAUSE = 0.25
#: Connections accepted per readable event at most (Tornado's own accept handler uses 128).
ACCEPT_BATCH = 128
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class GuardedHTTPServer(HTTPServer):
    """``GuardedHTTPServer(app, admit=fn, header_timeout=10, **HTTPServer kwargs)``: see the module docstring.

    ``admit(ip)`` -> bool decides at accept (``ip`` is ``""`` for a unix socket).
    ``refused`` and ``accept_pauses`` count what the guards did.
    """

    def initialize(  # type: ignore[override]  # HTTPServer is built through Configurable.initialize
        self, request_callback: Any, admit: Callable[[str], bool] | None = None, header_timeout: float = 10.0, **kwargs: Any
    ) -> None:
        super().initialize(request_callback, **kwargs)
        self.admit = admit or (lambda _ip: True)
        # HTTPServer derives header_timeout from idle_connection_timeout; set it directly so
        # that the one span Tornado has (see the module docstring) is the short one.
        self.conn_params.header_timeout = header_timeout
        self.refused = 0
        self.accept_pauses = 0

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        # TCPServer.add_sockets with our accept handler in place of tornado.netutil's, which
        # lets EMFILE escape to the event loop.  stop() pops and calls self._handlers[fd].
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = self._accept_handler(sock)

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        ip = str(address[0]) if isinstance(address, tuple) and address else ""
        if not self.admit(ip):
            self.refused += 1
            logger.warning("closed a connection from %s at accept: not in server.allow_ips, trusted_proxies or probe_ips", printable(ip, 64))
            stream.close()
            return
        super().handle_stream(stream, address)

    def _accept_handler(self, sock: socket.socket) -> Callable[[], None]:
        """Watch ``sock`` for connections; returns the function that stops watching."""
        io_loop = IOLoop.current()
        removed = False
        paused: object | None = None  # the call_later handle while accepting is paused

        def resume() -> None:
            nonlocal paused
            paused = None
            if not removed:
                io_loop.add_handler(sock, on_readable, IOLoop.READ)

        def on_readable(_fd: Any, _events: int) -> None:
            nonlocal paused
            for _ in range(ACCEPT_BATCH):
                if removed:
                    return
                try:
                    connection, address = sock.accept()
                except BlockingIOError:
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as e:
                    if e.errno not in _OUT_OF_RESOURCES:
                        raise
                    # The connection stays in the backlog and the socket stays readable:
                    # retrying at once would spin.  Open connections go on, and free
                    # descriptors as they close.
                    self.accept_pauses += 1
                    logger.error("cannot accept connections: %s; pausing accept for %.2fs (raise LimitNOFILE?)", os.strerror(e.errno or 0), ACCEPT_PAUSE)
                    io_loop.remove_handler(sock)
                    paused = io_loop.call_later(ACCEPT_PAUSE, resume)
                    return
                self._handle_connection(connection, address)

        def remove() -> None:
            nonlocal removed
            removed = True
            if paused is not None:
                io_loop.remove_timeout(paused)
            else:
                io_loop.remove_handler(sock)

        io_loop.add_handler(sock, on_readable, IOLoop.READ)
        return remove
