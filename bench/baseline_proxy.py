"""The baseline promptfleet is measured against: one process, FastAPI + AsyncOpenAI, no Ray.

    python -m bench.baseline_proxy --upstream http://127.0.0.1:9100/v1 --port 9200

It forwards /v1/chat/completions to one upstream, the way a hand-written
single-process gateway would (the baseline row of the bench.gateway table in docs/performance.md).
Not part of the product; used by ``bench.gateway``.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from openai import AsyncOpenAI


def create_app(upstream: str) -> FastAPI:
    client = AsyncOpenAI(
        base_url=upstream,
        api_key="unused",
        max_retries=0,
        http_client=httpx2.AsyncClient(limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=1000)),
    )
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        result = await client.post("/chat/completions", cast_to=object, body=body)
        return JSONResponse(result)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream base URL (…/v1)")
    parser.add_argument("--port", type=int, default=9200)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
