"""Benchmark: tool calls on the embedded model, against plain chat of the same length (no Ray).

    python -m bench.toolcalls [--repeat 5] [--threads 1]

Loads the embedded model (``LlamaCppProvider``, as a ModelWorker holds it) and times, interleaved
``--repeat`` times: a plain chat answer, a ``tool_choice: required`` call (grammar = the call), and
``tool_choice: auto`` answered with text and (after earlier turns with calls) with a call, each
capped at 48 tokens, temperature 0. Prints median
latency, completion tokens and tokens per second for each, and the tool-prompt's extra prompt
tokens: what holding the model to a function's schema costs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _earlier(number: int, city: str) -> list[dict[str, Any]]:
    call = {"id": f"call_{number}", "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "{city}", "unit": "celsius"}}'}}
    return [{"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{number}", "content": "sun"},
            {"role": "assistant", "content": "It is sunny."}]


# Earlier turns with calls: under `auto`, SmolLM2 then answers with a call.
HISTORY = [*_earlier(1, "London"), *_earlier(2, "Rome"), {"role": "user", "content": "Weather in Paris?"}]
CASES: dict[str, dict[str, Any]] = {
    "plain chat": {},
    "tool_choice=required": {"tools": [WEATHER], "tool_choice": "required"},
    "tool_choice=auto, text": {"tools": [WEATHER], "tool_choice": "auto"},
    "tool_choice=auto, call": {"tools": [WEATHER], "tool_choice": "auto", "messages": HISTORY},
}


async def run(repeat: int, threads: int) -> None:
    from deployments.config import LlamaCppModel, embedded_model_path
    from deployments.providers.llamacpp import LlamaCppProvider

    provider = LlamaCppProvider(LlamaCppModel(provider="llamacpp", name="smollm2", n_threads=threads),
                                Path(embedded_model_path()))
    seconds: dict[str, list[float]] = {name: [] for name in CASES}
    tokens: dict[str, list[int]] = {name: [] for name in CASES}
    prompts: dict[str, int] = {}
    calls: dict[str, int] = {name: 0 for name in CASES}
    for _ in range(repeat):
        for name, extra in CASES.items():
            started = time.perf_counter()
            reply = await provider.chat({"model": "smollm2", "messages": ASK, "max_tokens": 48, "seed": 7,
                                         "temperature": 0, **extra})
            seconds[name].append(time.perf_counter() - started)
            tokens[name].append(reply["usage"]["completion_tokens"])
            prompts[name] = reply["usage"]["prompt_tokens"]
            calls[name] += reply["choices"][0]["finish_reason"] == "tool_calls"
    await provider.close()
    print(f"embedded SmolLM2-135M, {threads} thread(s), {repeat} runs each, max_tokens 48")
    print(f"{'case':26} {'median s':>9} {'tokens':>7} {'tok/s':>7} {'prompt':>7} {'calls':>6}")
    for name in CASES:
        median, count = statistics.median(seconds[name]), statistics.median(tokens[name])
        print(f"{name:26} {median:9.2f} {count:7.0f} {count / median:7.1f} {prompts[name]:7d} "
              f"{calls[name]:>3}/{repeat}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per case (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: %(default)s)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.repeat, args.threads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
