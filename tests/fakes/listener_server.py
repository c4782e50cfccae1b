"""The Gateway's own listener (deployments.gateway.listener) serving a small app behind the Gateway's
body-size layer, in a process of its own, so a test can count that process's file descriptors.

    python -m tests.fakes.listener_server HOST PORT HEADER_TIMEOUT_S BODY_TIMEOUT_S MAX_CONNS MAX_PER_IP

Routes: ``GET /ping`` -> ``{"ok": true}``; ``POST /v1/echo`` -> ``{"bytes": <body length>}`` with a
body limit of 1,000,000 bytes. Prints ``ready`` once listening; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys

from fastapi import FastAPI, Request

from deployments.gateway.ingress import BodySizeLimit
from deployments.gateway.listener import Listener
from deployments.gateway.protocol import ListenerLimits

BODY_LIMIT = 1_000_000


def build_app() -> BodySizeLimit:
    api = FastAPI()

    @api.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @api.post("/v1/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return BodySizeLimit(api, limit=BODY_LIMIT)


async def serve(argv: list[str]) -> None:
    host, port, header_s, body_s, max_conns, per_ip = argv
    limits = ListenerLimits(header_timeout_s=float(header_s), body_timeout_s=float(body_s),
                            max_connections=int(max_conns), max_connections_per_ip=int(per_ip))
    listener = Listener(build_app(), host, int(port), limits)
    listener.start()  # its socket listens already: connections wait in the backlog until it accepts
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1:]))
