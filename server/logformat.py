"""Where log records go and how they look: ``logging.format`` and ``logging.file``.

``text`` is one human line a record (``2024-05-01 12:00:00,123 INFO server.app: listening on ...``);
``json`` is one JSON object a line for log shippers (Loki, Filebeat, Vector), which would otherwise
have to parse that text, and which must never see a traceback split over several lines:

    {"time": "2024-05-01T04:00:00.123+00:00", "level": "INFO", "logger": "server.app", "message": "listening on ..."}

plus ``"exception"`` (the traceback, one string) and ``"stack"`` when a record carries them.
Redaction (:mod:`server.redact`) is a filter on the handler, so it has masked the message and
the exception text before either formatter runs: both formats carry the same masked text.

``logging.file`` is a :class:`logging.handlers.WatchedFileHandler`: when logrotate moves the
file away, the next record notices the changed inode and opens a new file at the path, so
neither a ``copytruncate`` (which loses lines) nor a signal to the server is needed.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import sys

from server.config import ConfigError, LoggingConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The name of the handler token_server installs, so that a second call replaces it (and
#: leaves any other handler, such as a test's, alone).
HANDLER_NAME = "token_server"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; the time in UTC, ISO 8601 with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:  # a record no redaction filter has seen
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        # ensure_ascii=False: Chinese errmsg texts stay readable; json escapes every newline.
        return json.dumps(out, ensure_ascii=False)


def build_handler(cfg: LoggingConfig | None, to_file: bool = True) -> logging.Handler:
    """The handler for ``cfg`` (None: text on stderr).  ``to_file=False`` keeps stderr even when
    ``logging.file`` is set (``--check`` must not create a log file, owned by whoever ran it).

    Raises ConfigError (one line) when the file cannot be opened.
    """
    handler: logging.Handler
    if cfg is not None and cfg.file and to_file:
        try:
            handler = logging.handlers.WatchedFileHandler(cfg.file, encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"logging.file: cannot open {cfg.file} ({e.strerror}); create its directory and let the server's user write there"
            ) from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if cfg is not None and cfg.format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.set_name(HANDLER_NAME)
    return handler


def install_handler(handler: logging.Handler, level: str) -> None:
    """Make ``handler`` the root logger's only token_server handler, at ``level``."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
