"""The embedded model's provider in this process, on the real SmolLM2 file: no Ray, no HTTP.

The Serve tier drives the same provider through a worker (tests/serve/test_local_batching.py,
test_tools.py, test_embeddings.py); here the decoder's promises are checked where a failure names
the line that broke: a greedy answer is the same alone and among other sequences, its logprobs
are those of the token it chose, stop strings and ``max_tokens`` end it as OpenAI says, a stream
carries the same text as the JSON answer, a consumer that leaves frees its slot, and embeddings
of one request are computed together yet each as if alone (to rounding).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from deployments.config import LlamaCppModel
from deployments.providers import Provider, build_provider
from deployments.schemas import StreamEnd

PROMPT = "Name three things a lighthouse keeper does."
OTHERS = ["Write a haiku about rain.", "What is two plus two?", "Describe a cat in one sentence."]


def chat_body(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], "temperature": 0, **fields}


@pytest.fixture(scope="module")
def chat_model() -> Iterator[Provider]:
    provider = build_provider(LlamaCppModel(name="smollm2", provider="llamacpp", n_ctx=512, slots=4, n_threads=1))
    yield provider
    asyncio.run(provider.close())


@pytest.fixture(scope="module")
def embed_model() -> Iterator[Provider]:
    provider = build_provider(LlamaCppModel(name="smollm2-embed", provider="llamacpp", capabilities=["embeddings"],
                                            pooling="mean", n_ctx=512, n_batch=512, n_threads=1))
    yield provider
    asyncio.run(provider.close())


def content(completion: dict[str, Any], index: int = 0) -> str:
    text = completion["choices"][index]["message"]["content"]
    assert isinstance(text, str)
    return text


def test_a_greedy_answer_is_the_same_alone_and_among_other_sequences(chat_model: Provider) -> None:
    body = chat_body(PROMPT, max_tokens=24, logprobs=True, top_logprobs=2)

    async def alone_then_together() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        alone = await chat_model.chat(body)
        together = await asyncio.gather(chat_model.chat(body),
                                        *(chat_model.chat(chat_body(o, max_tokens=24)) for o in OTHERS))
        return alone, together

    alone, together = asyncio.run(alone_then_together())
    assert content(alone).strip()
    assert content(together[0]) == content(alone)
    assert together[0]["choices"][0]["logprobs"] == alone["choices"][0]["logprobs"]
    assert {content(c) for c in together[1:]} != {content(alone)}  # the neighbours did decode their own


def test_greedy_logprobs_are_those_of_the_chosen_token(chat_model: Provider) -> None:
    completion = asyncio.run(chat_model.chat(chat_body(PROMPT, max_tokens=8, logprobs=True, top_logprobs=3)))
    entries = completion["choices"][0]["logprobs"]["content"]
    assert len(entries) == completion["usage"]["completion_tokens"] == 8
    assert "".join(e["token"] for e in entries) == content(completion)
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 3
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert entry["logprob"] <= 0 and math.isfinite(entry["logprob"])
        # At temperature 0 the chosen token is the most likely one.
        assert (top[0]["token"], top[0]["logprob"]) == (entry["token"], entry["logprob"])
        assert bytes(entry["bytes"]).decode() == entry["token"]


def test_max_tokens_and_stop_end_the_answer_as_openai_says(chat_model: Provider) -> None:
    long = asyncio.run(chat_model.chat(chat_body(PROMPT, max_tokens=12)))
    assert long["choices"][0]["finish_reason"] == "length"
    assert long["usage"]["completion_tokens"] == 12
    text = content(long)
    word = text.split()[len(text.split()) // 2]  # a word from the middle of the answer
    stopped = asyncio.run(chat_model.chat(chat_body(PROMPT, max_tokens=12, stop=[word])))
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert content(stopped) == text[: text.index(word)]


def test_a_stream_carries_the_text_of_the_json_answer(chat_model: Provider) -> None:
    body = chat_body(PROMPT, max_tokens=16)

    async def read() -> tuple[str, StreamEnd | None, str | None]:
        parts, end, reason = [], None, None
        async for item in chat_model.stream(body):
            if isinstance(item, StreamEnd):
                end = item
                continue
            for choice in item["choices"]:
                parts.append(choice["delta"].get("content") or "")
                reason = choice.get("finish_reason") or reason
        return "".join(parts), end, reason

    text, end, reason = asyncio.run(read())
    assert text == content(asyncio.run(chat_model.chat(body)))
    assert end is not None and end.usage is not None and end.usage.completion_tokens == 16
    assert reason == "length"


def test_consumers_that_leave_free_their_slots(chat_model: Provider) -> None:
    """Four slots held by streams whose readers leave after a chunk; a fifth request still runs."""

    async def leave_early() -> dict[str, Any]:
        streams: list[AsyncIterator[Any]] = [chat_model.stream(chat_body(o, max_tokens=400))
                                             for o in [PROMPT, *OTHERS]]
        for stream in streams:
            await anext(stream)
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        return await asyncio.wait_for(chat_model.chat(chat_body(PROMPT, max_tokens=4)), timeout=60)

    assert asyncio.run(leave_early())["usage"]["completion_tokens"] == 4


def test_n_choices_with_a_seed_are_decoded_side_by_side(chat_model: Provider) -> None:
    body = chat_body(PROMPT, max_tokens=8, temperature=1.0, seed=7, n=2)
    first, again = asyncio.run(chat_model.chat(body)), asyncio.run(chat_model.chat(body))
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [content(first, i) for i in (0, 1)] == [content(again, i) for i in (0, 1)]  # the seed reproduces
    assert first["usage"]["completion_tokens"] == 16


def test_embeddings_of_one_request_equal_each_input_alone(embed_model: Provider) -> None:
    texts = ["a lighthouse on a cliff", "two plus two is four", "a lighthouse on a cliff"]

    async def embed() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        together = await embed_model.embed({"model": "smollm2-embed", "input": texts})
        alone = [await embed_model.embed({"model": "smollm2-embed", "input": t}) for t in texts[:2]]
        return together, alone

    together, alone = asyncio.run(embed())
    vectors = [item["embedding"] for item in together["data"]]
    assert [item["index"] for item in together["data"]] == [0, 1, 2]
    # Batched sums differ from single ones in the last bits only.
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5)
    assert vectors[1] != pytest.approx(vectors[0], abs=1e-2)
    for vector, single in zip(vectors, alone, strict=False):
        assert vector == pytest.approx(single["data"][0]["embedding"], abs=1e-5)
    assert together["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone) + \
        alone[0]["usage"]["prompt_tokens"]
    assert len(vectors[0]) == 576  # SmolLM2-135M's hidden size


def test_many_inputs_in_one_embedding_request(embed_model: Provider) -> None:
    inputs = [f"sentence number {i}" for i in range(256)]
    answer = asyncio.run(embed_model.embed({"model": "smollm2-embed", "input": inputs}))
    assert [item["index"] for item in answer["data"]] == list(range(256))
    assert len({tuple(item["embedding"][:4]) for item in answer["data"]}) > 200  # not one vector repeated
