"""/v1/completions on a local GGUF model, as a mixin of ``LlamaCppProvider``: one decoder job per prompt.

The prompts of one request are decoded side by side by the provider's ``Decoder`` (one sequence
each). JSON: one choice per prompt, in order. Streaming: ``text_completion`` chunks prompt after
prompt (each choice's ``index`` is its prompt's), handed to the event loop as they come; a client
that goes away frees its slot at the next step. ``logprobs`` (0–5) is the legacy shape
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) from the sampled position's
logits; with ``echo`` it would need the prompt's logits, which are not kept: a 400 naming
``logprobs``. What llama.cpp cannot honour here is a 400 naming the field
(``LOCAL_COMPLETION_REFUSED``, ``n``/``best_of`` above 1), never dropped; a prompt that does not
fit the context is a 400 naming ``prompt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from deployments.config import LlamaCppModel
from deployments.errors import InvalidRequest
from deployments.providers.llamacpp_decode import Decoder, Finished, Job
from deployments.providers.llamacpp_sampling import Sampling
from deployments.schemas import Share, StreamEnd, Usage
from deployments.schemas.base import OpenAIBody
from deployments.schemas.completions import CompletionRequest
from deployments.schemas.inputs import items

if TYPE_CHECKING:
    from llama_cpp import Llama

# /v1/completions fields llama.cpp cannot honour here: refused with a 400 naming them, never dropped.
# (`suffix` needs a fill-in-the-middle model.)
LOCAL_COMPLETION_REFUSED = ("suffix", "logit_bias")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# llama-cpp-python's ``create_completion`` defaults, which completions have always had.
COMPLETION_TEMPERATURE = 0.8
TOP_P = 0.95


def refuse_unknown(body: dict[str, Any], schema: type[OpenAIBody], model: str) -> None:
    """400 naming the first field of ``body`` that ``schema`` does not know: upstreams get unknown fields
    as sent, a local model would drop them silently."""
    for name in body:
        if name not in schema.model_fields:
            raise InvalidRequest(f"{name}: unknown field, not supported by local model '{model}'.", param=name)


def legacy_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """OpenAI's legacy ``logprobs`` of a completion's tokens, the first at ``offset`` of the text."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class LlamaCppCompletions:
    """Text completions; ``LlamaCppProvider`` supplies the model, its decoder and its metrics."""

    config: LlamaCppModel
    llm: Llama
    decoder: Decoder
    _request: Callable[[], contextlib.AbstractContextManager[None]]

    def _completion_jobs(self, body: dict[str, Any]) -> list[tuple[str, Job]]:
        """Each prompt's text (for ``echo``) and job; 400 naming what this model cannot honour."""
        refuse_unknown(body, CompletionRequest, self.config.name)
        for name in LOCAL_COMPLETION_REFUSED:
            if body.get(name) is not None:
                raise InvalidRequest(f"{name}: not supported by local model '{self.config.name}'.", param=name)
        for name in ("n", "best_of"):
            if body.get(name) not in (None, 1):
                raise InvalidRequest(f"{name}: local model '{self.config.name}' makes one choice per prompt.",
                                     param=name)
        if body.get("logprobs") is not None and body.get("echo"):
            raise InvalidRequest(f"logprobs: local model '{self.config.name}' gives no log probabilities of an "
                                 "echoed prompt; drop echo or logprobs.", param="logprobs")
        stop = body.get("stop")
        sampling = Sampling(
            temperature=body["temperature"] if body.get("temperature") is not None else COMPLETION_TEMPERATURE,
            top_p=body["top_p"] if body.get("top_p") is not None else TOP_P,
            presence_penalty=body.get("presence_penalty") or 0.0,
            frequency_penalty=body.get("frequency_penalty") or 0.0,
            seed=body["seed"] % 2**32 if body.get("seed") is not None else self.config.seed)
        jobs = []
        for prompt in items(body["prompt"]):
            if isinstance(prompt, str):
                tokens = self.llm.tokenize(prompt.encode(), add_bos=True, special=True) or [self.llm.token_bos()]
                text = prompt
            else:
                if max(prompt, default=0) >= self.llm.n_vocab():
                    raise InvalidRequest(f"prompt: token ids of model '{self.config.name}' are below "
                                         f"{self.llm.n_vocab()}.", param="prompt")
                tokens, text = list(prompt) or [self.llm.token_bos()], self.llm.detokenize(prompt).decode(
                    errors="replace")
            if len(tokens) >= self.config.n_ctx:
                raise InvalidRequest(f"The prompt is {len(tokens)} tokens; model '{self.config.name}' has a "
                                     f"context of {self.config.n_ctx} tokens.", param="prompt")
            jobs.append((text if body.get("echo") else "", Job(
                tokens, sampling, body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS,
                [stop] if isinstance(stop, str) else stop or [], top_logprobs=body.get("logprobs"))))
        return jobs

    async def complete(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """A ``text_completion`` for ``body`` (a validated ``CompletionRequest``): one choice per prompt."""
        from deployments.providers.llamacpp import collect

        jobs = self._completion_jobs(body)
        counts = [0] * len(jobs)

        async def one(index: int, echo: str, job: Job) -> dict[str, Any]:
            text, logprobs, finished = await collect(self.decoder, job)
            counts[index] = finished.completion_tokens
            return {"text": echo + text, "index": index, "finish_reason": finished.reason,
                    "logprobs": legacy_logprobs(logprobs, len(echo)) if job.top_logprobs is not None else None}

        with self._request():
            choices = await asyncio.gather(*(one(i, echo, job) for i, (echo, job) in enumerate(jobs)))
        prompt_tokens = sum(len(job.prompt) for _, job in jobs)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.name, "choices": list(choices),
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                          "total_tokens": prompt_tokens + sum(counts)}}

    async def complete_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamEnd]:
        """``text_completion`` chunks, prompt after prompt (each choice's ``index`` is its prompt's),
        then the usage chunk if asked for, then a ``StreamEnd``."""
        jobs = self._completion_jobs(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.name}
        counts = [0] * len(jobs)
        with self._request():
            for index, (echo, job) in enumerate(jobs):
                offset = len(echo)
                if echo:
                    yield {**head, "choices": [{"text": echo, "index": index, "logprobs": None, "finish_reason": None}]}
                async with contextlib.aclosing(self.decoder.run(job)) as pieces:
                    async for piece in pieces:
                        wanted = job.top_logprobs is not None
                        if isinstance(piece, Finished):
                            counts[index] = piece.completion_tokens
                            yield {**head, "choices": [{"text": "", "index": index, "logprobs": None,
                                                        "finish_reason": piece.reason}]}
                            continue
                        logprobs = legacy_logprobs(piece.logprobs, offset) if wanted else None
                        offset += len(piece.text)
                        yield {**head, "choices": [{"text": piece.text, "index": index, "logprobs": logprobs,
                                                    "finish_reason": None}]}
        prompt_tokens = sum(len(job.prompt) for _, job in jobs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts),
                 "total_tokens": prompt_tokens + sum(counts)}
        if include_usage:
            yield {**head, "choices": [], "usage": usage}
        yield StreamEnd(usage=Usage.of(usage))

