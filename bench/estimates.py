"""Benchmark: what the token estimates and the /v1/responses plan cost per request (no Ray, one process).

    python -m bench.estimates [--repeat 7] [--number 20000]

Every metered call books a prompt estimate before it is sent (``core.tokens``), on the request path of
the Gateway, the TaskRunner and batch drivers. This prints, in microseconds per call (the median of
``--repeat`` timings of ``--number`` calls each), the estimate of a plain chat request as it was made
before tools counted (``prompt_tokens(messages)``) and as it is made now (``chat_prompt_tokens``), the
same for a request with three tool schemas, and the plan of a /v1/responses request
(``ResponseCalls.plan``: chain, translation or forwarded body, estimate) on a translated model and on a
forwarding one, beside what the route did before the call (translate, chain, estimate).
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from typing import Any

from deployments.config import OpenAIModel
from deployments.core import responses
from deployments.core.tokens import chat_prompt_tokens, prompt_tokens
from deployments.model_calls import ModelCalls
from deployments.response_calls import ResponseCalls
from deployments.schemas import ChatCompletionRequest
from deployments.schemas.responses import ResponseCreate

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Ray? " * 20}]
TOOLS = [{"type": "function", "function": {"name": f"tool_{i}", "description": "Look something up.", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
    "required": ["query"]}}} for i in range(3)]


def _median_us(fn: Callable[[], Any], repeat: int, number: int) -> float:
    return statistics.median(timeit.repeat(fn, repeat=repeat, number=number)) / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.estimates", description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timings per case (default: %(default)s)")
    parser.add_argument("--number", type=int, default=20000, help="calls per timing (default: %(default)s)")
    args = parser.parse_args(argv)

    plain = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES})
    tooled = ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, "tools": TOOLS})
    models = [OpenAIModel(provider="openai", name="chat", base_url="http://127.0.0.1:1/v1"),
              OpenAIModel(provider="openai", name="native", base_url="http://127.0.0.1:1/v1",
                          upstream_api="responses")]
    model_calls = ModelCalls(models, transport=None)  # type: ignore[arg-type]  # plans only, no calls
    calls = ResponseCalls(model_calls)
    body = {"instructions": "You are terse.", "input": "What is Ray? " * 20, "max_output_tokens": 64}
    translated, forwarded = (ResponseCreate.model_validate({"model": m, **body}) for m in ("chat", "native"))

    def before(request: ResponseCreate) -> int:
        """What the route did before the call: translate, resolve the chain, estimate the chat request."""
        chat = responses.to_chat(request)
        model_calls.chain(chat, capability="responses")
        return model_calls.estimate(chat)

    cases: list[tuple[str, Callable[[], Any]]] = [
        ("chat estimate, before (messages only)", lambda: prompt_tokens(plain.messages)),
        ("chat estimate, now (no tools)", lambda: chat_prompt_tokens(plain)),
        ("chat estimate, now (3 tools)", lambda: chat_prompt_tokens(tooled)),
        ("responses, before: translate, chain, estimate", lambda: before(translated)),
        ("responses, now: plan and estimate, translated", lambda: calls.estimate(translated, calls.plan(translated))),
        ("responses, now: plan and estimate, forwarded", lambda: calls.estimate(forwarded, calls.plan(forwarded))),
    ]
    print(f"{'case':<48} µs per call (median of {args.repeat} × {args.number})")
    for name, fn in cases:
        print(f"{name:<48} {_median_us(fn, args.repeat, args.number):8.2f}")
    print(f"(3 tools add {chat_prompt_tokens(tooled) - chat_prompt_tokens(plain)} tokens to the estimate of "
          f"{chat_prompt_tokens(plain)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
