"""The Gateway's own HTTP listener: one stable address, served straight from the ingress replicas.

Why: Serve's proxy actor adds a second Python hop per request and tops out near
~110–155 req/s on two cores, while Serve's direct ingress puts each ingress
replica on its own changing port (30000+) and HAProxy mode binds its stats and
metrics ports on every interface. Here every Gateway replica on a node binds the
same configured address with ``SO_REUSEPORT``, so the kernel spreads connections
across them; the address stays stable when replicas come and go, and each node
of a cluster answers on it.

The server runs on the replica's own event loop (uvicorn, httptools, no
lifespan, no signal handlers: the replica owns the process), with the connection
guards of ``protocol`` (header and body timeouts, connection caps, lingering close,
parse errors in the OpenAI shape).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from deployments.gateway.protocol import ListenerLimits, guarded_protocol

logger = logging.getLogger("ray.serve")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The Ray replica process owns its signals. With RAY_SERVE_THROUGHPUT_OPTIMIZED user code
        # runs on the main thread, where uvicorn would otherwise replace Ray's handlers and
        # re-raise SIGTERM after its own shutdown.
        yield


def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class Listener:
    """Serves ``app`` on ``host:port`` from inside the current event loop until ``stop()``."""

    def __init__(self, app: ASGIApp, host: str, port: int, limits: ListenerLimits | None = None) -> None:
        self.host, self.port = host, port
        self.protocol = guarded_protocol(limits or ListenerLimits())
        config = uvicorn.Config(
            app,
            http=self.protocol,
            loop="none",
            lifespan="off",
            access_log=False,
            # No logging config of uvicorn's own: applying one (logging.config.dictConfig) closes every
            # handler in the process, Serve's replica log included, and the Gateway's log went silent.
            log_config=None,
            log_level="warning",
            timeout_keep_alive=30,
            backlog=2048,
        )
        self.server = _EmbeddedServer(config)
        self.sock = reuseport_socket(host, port)
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        logger.info("gateway listening on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.task, timeout=10)
        self.sock.close()
