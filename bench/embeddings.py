"""Benchmark: embeddings per second through promptfleet vs. llama.cpp called directly, same model and threads.

    python -m bench.embeddings [--inputs 128] [--repeat 3] [--threads 1]

Starts a private Ray cluster running ``configs/serve.yaml`` with one model, ``smollm2-embed`` (the
embedded SmolLM2 GGUF in llama.cpp's embedding mode, mean pooling, ``n_threads`` threads), and loads
the same file in this process with llama-cpp-python's own ``Llama.embed`` (same threads, batch size
and pooling). Interleaved, ``--repeat`` times each, median reported:

- direct: ``Llama.embed`` over all inputs in one call;
- gateway, one request: ``POST /v1/embeddings`` with all inputs (the openai client, base64 as it asks);
- gateway, one request per input: the same inputs as separate requests, 4 at a time.

Prints embeddings/s of each and the ratios gateway / direct (goal >= 90 %) and one request / many.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kit import private_cluster

MODEL = "smollm2-embed"


def inputs(count: int) -> list[str]:
    """Short sentences (about 8 tokens each), all different."""
    topics = ("weather", "cats", "trains", "music", "rivers", "coffee", "chess")
    return [f"note {i} about {topics[i % len(topics)]} and more" for i in range(count)]


def direct_rate(llm: Any, texts: list[str]) -> float:
    started = time.perf_counter()
    vectors = llm.embed(texts, normalize=True)
    elapsed = time.perf_counter() - started
    assert len(vectors) == len(texts)
    return len(texts) / elapsed


async def one_request(base_url: str, texts: list[str]) -> float:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        started = time.perf_counter()
        reply = await client.embeddings.create(model=MODEL, input=texts)
        elapsed = time.perf_counter() - started
    assert len(reply.data) == len(texts)
    return len(texts) / elapsed


async def many_requests(base_url: str, texts: list[str], concurrency: int = 4) -> float:
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600) as client:
        slots = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with slots:
                await client.embeddings.create(model=MODEL, input=text)

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        return len(texts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=128, help="inputs per measurement (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per target (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: %(default)s)")
    args = parser.parse_args(argv)

    from llama_cpp import Llama

    from deployments.config import embedded_model_path
    from deployments.providers.llamacpp import POOLING

    texts = inputs(args.inputs)
    n_batch = 512
    model = {"name": MODEL, "provider": "llamacpp", "capabilities": ["embeddings"], "pooling": "mean",
             "n_ctx": n_batch, "n_batch": n_batch, "n_threads": args.threads}
    llm = Llama(model_path=str(embedded_model_path()), n_ctx=n_batch, n_batch=n_batch, n_ubatch=n_batch,
                n_threads=args.threads, n_threads_batch=args.threads, embedding=True,
                pooling_type=POOLING["mean"], verbose=False)
    with tempfile.TemporaryDirectory(prefix="pf-bench-") as state, private_cluster([model], Path(state)) as cluster:
        asyncio.run(one_request(cluster.api, texts[:4]))  # warm-up: the worker has loaded its model
        runs: dict[str, list[float]] = {"llama.cpp direct": [], "gateway, 1 request": [],
                                        "gateway, 1 request per input": []}
        for _ in range(args.repeat):
            runs["llama.cpp direct"].append(direct_rate(llm, texts))
            runs["gateway, 1 request"].append(asyncio.run(one_request(cluster.api, texts)))
            runs["gateway, 1 request per input"].append(asyncio.run(many_requests(cluster.api, texts)))
    medians = {name: statistics.median(rates) for name, rates in runs.items()}
    print(f"{args.inputs} inputs of about 8 tokens, SmolLM2-135M GGUF, mean pooling, {args.threads} thread(s), "
          f"median of {args.repeat}")
    for name, rate in medians.items():
        spread = ", ".join(f"{r:.1f}" for r in runs[name])
        print(f"{name:<32} {rate:>8.1f} embeddings/s   ({spread})")
    direct, batched, single = (medians[n] for n in runs)
    print(f"{'gateway (1 request) / direct':<32} {100 * batched / direct:>7.1f} %")
    print(f"{'1 request / 1 request per input':<32} {batched / single:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
