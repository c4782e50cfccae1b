"""A real, fast, fault-injectable fake of an OpenAI-compatible upstream.

Serves, over real HTTP (raw ASGI under uvicorn; httptools + uvloop when installed):

    POST /v1/chat/completions  OpenAI chat completion; ``"stream": true`` answers SSE chunks and
                               ``stream_options.include_usage`` adds a usage chunk before [DONE]
    POST /v1/embeddings        deterministic unit vectors (``fake_vector``; ``dimensions`` long,
                               default 8; ``encoding_format: base64`` as OpenAI encodes it)
    POST /v1/completions       ``"echo: " + <prompt>`` per prompt, JSON or SSE ``text_completion``
    POST /v1/responses         the chat answer in the Responses shape: a ``response`` object, or SSE
                               events in the documented order (``tests.fakes.responses_api``)
    GET  /v1/models[/<id>]     ``fake-model`` (a requested id is echoed back)
    POST /_control/config      ``{"mode": ..., **params}`` replaces the fault config (400 if bad)
    POST /_control/reset       back to the start-up config (mode ``ok``), zeroed stats
    GET  /_control/stats       ``{"calls", "calls_by_mode", "calls_by_route", "in_flight",
                                 "max_in_flight", "call_times", "last_authorization", "prompts",
                                 "last_bodies", "request_ids"}`` (``prompts``: the last user message
                                 of recent chat calls, oldest first; ``calls_by_route``: calls per
                                 model route, ``chat``, ``embeddings``, ``completions``,
                                 ``responses``; ``last_bodies``: the last request body of each route;
                                 ``request_ids``: the calls' ``X-Request-ID`` headers, None where
                                 there was none)

Answers (``tests.fakes.openai_routes``) are deterministic: ``"echo: " + <last user message>``,
a JSON instance of a requested schema, or one call of a requested tool. Faults
(``tests.fakes.upstream_faults``): ``ok``, ``rate_limit`` (429), ``error`` (500), ``slow``,
``hang``, ``drop_stream``, ``stall_stream``, each optionally for the first N calls only; an
``api_key`` makes calls without it answer 401. Error bodies have the OpenAI shape.

Layout: ``asgi`` (raw ASGI plumbing), ``upstream_faults`` (fault config, call stats),
``openai_routes`` (the answers), ``upstream_app`` (the ASGI app), and this module: the server and
its fixture wrapper, re-exporting the names tests and benches import from here.

In-process: :class:`FakeUpstream` serves from a daemon thread (the uvicorn-in-a-thread pattern of
encode/httpx's ``tests/conftest.py``). As a program: ``python -m tests.fakes.upstream --port 9100``.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import signal
import socket
import threading
import time
from types import FrameType, TracebackType
from typing import Any

import uvicorn

from tests.fakes.json_instances import minimal_instance
from tests.fakes.openai_routes import FAKE_DIMENSIONS, fake_vector
from tests.fakes.upstream_app import FakeUpstreamApp
from tests.fakes.upstream_faults import MAX_CALL_TIMES, MAX_PROMPTS, MODES, Control, FaultConfig

__all__ = [
    "FAKE_DIMENSIONS",
    "MAX_CALL_TIMES",
    "MAX_PROMPTS",
    "MODES",
    "FakeUpstream",
    "FakeUpstreamApp",
    "FaultConfig",
    "fake_vector",
    "main",
    "minimal_instance",
]


class _QuietDrop(logging.Filter):
    """Drops the error uvicorn logs for the truncated responses ``drop_stream`` makes on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


_QUIET_DROP = _QuietDrop()


class _Server(uvicorn.Server):
    """A uvicorn server that wakes ``hang``/``slow`` calls on exit and can print its URL.

    No ``install_signal_handlers`` override (encode/httpx's conftest has one): uvicorn >= 0.29
    only captures signals when it runs in the main thread.
    """

    def __init__(self, config: uvicorn.Config, app: FakeUpstreamApp, announce: bool) -> None:
        super().__init__(config)
        self.app, self.announce = app, announce

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.begin_close()
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            print(f"http://{self.config.host}:{self.config.port}", flush=True)


class FakeUpstream:
    """The fake upstream as an object: ``with FakeUpstream() as fake: use(fake.base_url)``.

    ``port=0`` picks a free port. :meth:`configure`, :meth:`reset` and :meth:`stats` are
    thread-safe and do what the ``/_control`` endpoints do.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency_ms: float = 0.0,
                 stream_chunks: int = 0, chunk_interval_ms: float = 0.0) -> None:
        self.control = Control(FaultConfig(latency_ms=latency_ms, stream_chunks=stream_chunks,
                                           chunk_interval_ms=chunk_interval_ms))
        self.app = FakeUpstreamApp(self.control)
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, the port being the bound one once started."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``: :attr:`url` + ``/v1``."""
        return self.url + "/v1"

    def configure(self, mode: str = "ok", **params: Any) -> None:
        """Replace the fault config (see :class:`FaultConfig`); ValueError/TypeError if invalid."""
        self.control.configure(FaultConfig(mode=mode, **params))

    def reset(self) -> None:
        """Back to the config given at construction (mode ``ok``, its ``latency_ms``); zero stats."""
        self.control.reset()

    def stats(self) -> dict[str, Any]:
        """The document ``GET /_control/stats`` answers."""
        return self.control.snapshot()

    def _build(self, announce: bool) -> _Server:
        # Binding here, not in uvicorn, is what makes port 0 usable: we learn the port first.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.port))
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, host=self.host, port=self.port, loop="auto", http="auto",
                                lifespan="on", access_log=False, log_level="warning",
                                timeout_graceful_shutdown=2)
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROP)  # after Config set up logging
        self._server = _Server(config, self.app, announce)
        return self._server

    def serve_forever(self) -> None:
        """Serve from the calling (main) thread until SIGINT/SIGTERM; print the URL when ready."""
        server = self._build(announce=True)
        try:
            server.run(sockets=[self._socket] if self._socket else None)
        finally:
            self._close_socket()

    def start(self, timeout: float = 10.0) -> FakeUpstream:
        """Serve from a daemon thread; return once a real HTTP request has been answered."""
        if self._thread is not None:
            raise RuntimeError("FakeUpstream already started")
        server = self._build(announce=False)
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]},
                                        name=f"fake-upstream-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the fake upstream did not start")
            time.sleep(0.005)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request("GET", "/_control/stats")
            conn.getresponse().read()
        finally:
            conn.close()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight ``hang``/``slow`` calls get 503) and join the thread."""
        if self._server is not None:
            self.app.begin_close()
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._server = None
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()  # usually closed already by uvicorn; closing twice is harmless
            self._socket = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGINT/SIGTERM; print the URL on one line once listening."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.upstream",
                                     description="A fake OpenAI-compatible upstream.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9100,
                        help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="latency of mode ok, in ms (default: %(default)s)")
    parser.add_argument("--stream-chunks", type=int, default=0,
                        help="content chunks per chat stream; 0: the answer in at most 4 (default: %(default)s)")
    parser.add_argument("--chunk-interval-ms", type=float, default=0.0,
                        help="pause between a chat stream's events, in ms (default: %(default)s)")
    args = parser.parse_args(argv)
    # uvicorn re-raises the signal it caught once it has shut down, under the handlers that were
    # in place before it ran; with these no-ops the program then returns 0 instead of dying of it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: None)
    FakeUpstream(args.host, args.port, args.latency_ms, args.stream_chunks, args.chunk_interval_ms).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
