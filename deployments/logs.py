"""The replica log of a promptfleet deployment: every line names its request, and lines go out within a second.

Serve writes each replica's ``ray.serve`` logger to ``logs/serve/replica_<app>_<deployment>_<id>.log``
through a ``MemoryHandler`` (ray/serve/_private/logging_utils.py). Two of its settings work against
finding a request in the logs, and ``watch_serve_log()`` (called once per replica process, by the
constructors of the deployments that log requests) mends both:

- it adds the request id (``deployments.request_ids.current()``) to each record that has none: Serve
  adds its request context only in JSON encoding or with its access log on, and serve.yaml keeps
  that access log off (a line per request of its own, at hundreds of requests per second);
- it flushes the buffer every ``FLUSH_EVERY_S``: with ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` Serve keeps
  up to 1000 records in memory and writes them only when the buffer is full or on an ERROR, so a
  quiet replica's lines could wait indefinitely. The flush runs on a daemon thread (``MemoryHandler``
  takes its lock for both flush and emit), nothing on the request path.
"""

from __future__ import annotations

import logging
import logging.handlers
import threading
import time

from deployments import request_ids

SERVE_LOGGER = "ray.serve"
FLUSH_EVERY_S = 1.0
_started = threading.Event()


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` (Serve's log formatters print it) from the request being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            request_id = request_ids.current()
            if request_id is not None:
                record.request_id = request_id
        return True


def _buffers() -> list[logging.handlers.MemoryHandler]:
    logger = logging.getLogger(SERVE_LOGGER)
    return [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]


def _flush_forever() -> None:
    while True:
        time.sleep(FLUSH_EVERY_S)
        for handler in _buffers():
            handler.flush()


def watch_serve_log() -> None:
    """Once per process: the request-id filter on Serve's replica log handler, and the flush thread."""
    if _started.is_set():
        return
    _started.set()
    for handler in _buffers():
        handler.addFilter(RequestIdFilter())
    threading.Thread(target=_flush_forever, name="promptfleet-log-flush", daemon=True).start()
