"""Log lines: one JSON object (or one line of text) per event, carrying the request's id.

Each process (the master, every worker, each command) logs to standard error through one
handler. The service's own loggers log at LOG_LEVEL; libraries at INFO and above only, and
those whose verbose lines carry what the service must never log (h2 and hpack print
decoded headers, Authorization included; SQLAlchemy prints statement parameters) at
WARNING, whatever LOG_LEVEL says.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii as quoted
from typing import Any

from service.config import Settings

# The id of the request being served (service/access.py sets it); None outside requests.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
QUIET_LIBRARIES = ("h2", "hpack", "hyperframe", "sqlalchemy", "alembic.runtime.plugins")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
USUAL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# A record's own attributes, which the JSON line names differently or leaves out.
_BASE = ("time", "level", "logger", "pid", "message", "request_id")

ACCESS = logging.getLogger("service.access")
ACCESS_FLUSH_SECONDS = 0.5  # access lines wait at most this long in the stream's buffer


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request it was logged in, if any."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries (`extra={"fields": {...}}`)."""
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, request_id, fields."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        # (method, route, status) -> the access line's parts that depend on nothing else;
        # bounded: only for the usual methods, and routes are the app's url rules.
        self._access_parts: dict[tuple[str, str, int], tuple[str, str]] = {}

    def _time(self, record: logging.LogRecord) -> str:
        return self._stamp_of(record.created, record.msecs)

    def _stamp_of(self, created: float, msecs: float) -> str:
        """ISO 8601 in UTC, to the millisecond; the seconds part is formatted once a second."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int(msecs):03d}Z"

    def access_line(
        self, method: str, route: str, status: int, seconds: float, rid: str, address: str
    ) -> str:
        """The line format() writes for an access record, composed without the record."""
        created = time.time()
        stamp = self._stamp_of(created, (created - int(created)) * 1000)
        key = (method, route, status)
        parts = self._access_parts.get(key)
        if parts is None:
            parts = (
                f'"message": {quoted(f"{method} {route} {status}")}, ',
                f'"method": {quoted(method)}, "route": {quoted(route)}, "status": {status}, ',
            )
            if method in USUAL_METHODS:
                self._access_parts[key] = parts
        return (
            f'{{"time": "{stamp}", "level": "INFO", "logger": "service.access", '
            f'"pid": {os.getpid()}, {parts[0]}'
            f'"request_id": {quoted(rid)}, {parts[1]}'
            f'"duration_ms": {round(seconds * 1000, 3)}, "address": {quoted(address)}}}'
        )

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        for name, value in fields_of(record).items():
            if name not in _BASE:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(line)  # the plain call is the fast one
        except (TypeError, ValueError):
            return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, then the request id and fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = [(name, value) for name, value in fields_of(record).items() if name not in _BASE]
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            extra.append(("request_id", request_id))
        if not extra:
            return text
        head, newline, rest = text.partition("\n")  # a traceback stays below the line
        pairs = " ".join(f"{name}={json.dumps(value, default=str)}" for name, value in extra)
        return f"{head} {pairs}{newline}{rest}"


class AccessLines:
    """Access lines for the JSON handler: composed by hand, written to its stream in batches.

    A log record and its generic formatting cost about 30 us per request, a tenth of the
    protected GET's CPU; the composed line (the same line) about 2.5 us. Standard error
    writes every line at once (a system call, 4 us more): these lines go into the bytes
    buffer under it instead, in order with every other line (the handler flushes its
    stream after each record), and reach the stream when the buffer fills or within
    ACCESS_FLUSH_SECONDS. A process killed outright loses at most those.
    """

    def __init__(self, handler: logging.StreamHandler[Any], formatter: JsonFormatter) -> None:
        self._handler = handler
        self._formatter = formatter
        threading.Thread(target=self._flush_often, name="access-log", daemon=True).start()

    def write(
        self, method: str, route: str, status: int, seconds: float, rid: str, address: str
    ) -> None:
        """Write one request's line."""
        handler = self._handler
        handler.acquire()
        try:
            line = self._formatter.access_line(method, route, status, seconds, rid, address)
            under = getattr(handler.stream, "buffer", None)
            if under is not None:
                under.write(f"{line}\n".encode())
            else:
                handler.stream.write(f"{line}\n")
                handler.stream.flush()
        except (OSError, ValueError):  # standard error closed or gone: nowhere to say so
            pass
        finally:
            handler.release()

    def _flush_often(self) -> None:
        while True:
            time.sleep(ACCESS_FLUSH_SECONDS)
            self._handler.flush()


# The JSON handler's access lines (see AccessLines); None: access lines are log records.
_lines: AccessLines | None = None


def access(method: str, route: str, status: int, seconds: float, rid: str, address: str) -> None:
    """Log one access line (logger service.access) for a request the app answered."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    if _lines is not None:
        _lines.write(method, route, status, seconds, rid, address)
        return
    fields = {
        "method": method,
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 3),
        "address": address,
    }
    ACCESS.info("%s %s %d", method, route, status, extra={"fields": fields})


def configure(settings: Settings) -> None:
    """Send this process's logs to standard error, formatted as settings say."""
    global _lines
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if settings.json_logs:
        formatter = JsonFormatter()
        handler.setFormatter(formatter)
        _lines = AccessLines(handler, formatter)
    else:
        handler.setFormatter(TextFormatter())
        _lines = None
    root = logging.getLogger()
    for old in root.handlers:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("service").setLevel(settings.log_level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
    # What no line shows, each looked up for every record (the logging HOWTO's
    # "Optimization" section): the calling frame, the thread, the process's name.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
