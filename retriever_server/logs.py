"""Logging: the command line's set-up (plain text, or one JSON object per line), and `EventCounter`,
which logs the first event of a kind as it happens and the next ones within an interval as one
count, so that a flood of refusals cannot flood the log."""

from __future__ import annotations

import json
import logging
import threading
import time

from retriever_server.wire.untrusted import one_line

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the `extra=` fields a call passed."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Configures the root logger once for a command-line process."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


class EventCounter:
    """Counts events by kind; logs the first of each interval, then how many more there were."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, level: int = logging.WARNING):
        self.logger, self.interval_s, self.level = logger, interval_s, level
        self.lock = threading.Lock()
        self.started: dict[str, float] = {}  # kind -> when its interval began
        self.more: dict[str, int] = {}  # kind -> events since the logged one
        self.totals: dict[str, int] = {}

    def record(self, kind: str, detail: str = "") -> None:
        """One event; `detail` is logged on one line, escaped and cut short."""
        now = time.monotonic()
        with self.lock:
            self.totals[kind] = self.totals.get(kind, 0) + 1
            begun = self.started.get(kind)
            if begun is not None and now - begun < self.interval_s:
                self.more[kind] = self.more.get(kind, 0) + 1
                return
            pending = self.more.pop(kind, 0)
            self.started[kind] = now
        if pending:
            self._log_count(kind, pending)
        self.logger.log(self.level, "%s%s", kind, f": {one_line(detail)}" if detail else "")

    def flush(self) -> None:
        """Logs the counts of intervals that have ended."""
        now = time.monotonic()
        with self.lock:
            due = [k for k, begun in self.started.items() if now - begun >= self.interval_s and self.more.get(k)]
            counts = {k: self.more.pop(k) for k in due}
        for kind, count in counts.items():
            self._log_count(kind, count)

    def _log_count(self, kind: str, count: int) -> None:
        self.logger.log(self.level, "%s: %d more in the last %.0f s", kind, count, self.interval_s)
