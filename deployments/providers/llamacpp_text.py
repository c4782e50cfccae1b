"""/v1/completions on a local GGUF model: llama.cpp's ``create_completion``, as a mixin of ``LlamaCppProvider``.

It shares the provider's one generation thread (``executor``) and queue metrics. JSON: one choice per
prompt, in order. Streaming: ``text_completion`` chunks prompt after prompt (each choice's ``index``
is its prompt's), handed from the thread to the event loop as they come (``_relay_thread``); a client
that goes away stops generation at the next token. What llama.cpp cannot honour here is a 400 naming
the field (``LOCAL_COMPLETION_REFUSED``, ``n``/``best_of`` above 1), never dropped; a prompt that does
not fit the context is a 400 naming ``prompt``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from deployments.config import LlamaCppModel
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.schemas import Share, StreamEnd, Usage
from deployments.schemas.base import OpenAIBody
from deployments.schemas.completions import CompletionRequest
from deployments.schemas.inputs import items
from deployments.telemetry import Metrics

if TYPE_CHECKING:
    from llama_cpp import Llama

logger = logging.getLogger("ray.serve")

# /v1/completions fields llama.cpp cannot honour here: refused with a 400 naming them, never dropped.
# (`suffix` needs a fill-in-the-middle model; `logprobs` a context keeping every logit.)
LOCAL_COMPLETION_REFUSED = ("suffix", "logprobs", "logit_bias")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Sampling fields create_completion takes as they are.
_SAMPLING_FIELDS = ("temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
_DONE = object()


def refuse_unknown(body: dict[str, Any], schema: type[OpenAIBody], model: str) -> None:
    """400 naming the first field of ``body`` that ``schema`` does not know: upstreams get unknown fields
    as sent, a local model would drop them silently."""
    for name in body:
        if name not in schema.model_fields:
            raise InvalidRequest(f"{name}: unknown field, not supported by local model '{model}'.", param=name)


class LlamaCppCompletions:
    """Text completions; ``LlamaCppProvider`` supplies the model, its thread and its metrics."""

    config: LlamaCppModel
    llm: Llama
    executor: ThreadPoolExecutor
    metrics: Metrics
    _enqueued: Callable[[asyncio.Future[Any]], None]

    def _completion_kwargs(self, body: dict[str, Any]) -> dict[str, Any]:
        refuse_unknown(body, CompletionRequest, self.config.name)
        for name in LOCAL_COMPLETION_REFUSED:
            if body.get(name) is not None:
                raise InvalidRequest(f"{name}: not supported by local model '{self.config.name}'.", param=name)
        for name in ("n", "best_of"):
            if body.get(name) not in (None, 1):
                raise InvalidRequest(f"{name}: local model '{self.config.name}' makes one choice per prompt.",
                                     param=name)
        kwargs: dict[str, Any] = {"max_tokens": body.get("max_tokens") or DEFAULT_COMPLETION_TOKENS,
                                  "echo": bool(body.get("echo"))}
        for name in _SAMPLING_FIELDS:
            if body.get(name) is not None:
                kwargs[name] = body[name]
        kwargs["seed"] = kwargs["seed"] % 2**32 if "seed" in kwargs else self.config.seed
        return kwargs

    def _does_not_fit(self, exc: ValueError) -> InvalidRequest:
        logger.info("llama.cpp rejected a completion: %s", exc)
        return InvalidRequest(f"The prompt does not fit the context of model '{self.config.name}' "
                              f"({self.config.n_ctx} tokens).", param="prompt")

    def _complete_one(self, prompt: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        """llama.cpp's create_completion for one prompt; a prompt that does not fit is a 400 naming it."""
        try:
            result: dict[str, Any] = self.llm.create_completion(prompt=prompt, **kwargs)  # type: ignore[assignment]
        except ValueError as exc:
            raise self._does_not_fit(exc) from None
        return result

    def _stream_one(self, prompt: Any, kwargs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks of one prompt's completion (llama.cpp checks the prompt at the first one)."""
        try:
            yield from self.llm.create_completion(prompt=prompt, stream=True, **kwargs)  # type: ignore[misc]
        except ValueError as exc:
            raise self._does_not_fit(exc) from None

    async def complete(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """A ``text_completion`` for ``body`` (a validated ``CompletionRequest``): one choice per prompt."""
        kwargs = self._completion_kwargs(body)
        prompts = items(body["prompt"])

        def generate() -> dict[str, Any]:
            started = time.monotonic()
            choices: list[dict[str, Any]] = []
            prompt_tokens = completion_tokens = 0
            for index, prompt in enumerate(prompts):
                result = self._complete_one(prompt, kwargs)
                choice = result["choices"][0]
                choice["index"] = index
                choices.append(choice)
                prompt_tokens += result["usage"]["prompt_tokens"]
                completion_tokens += result["usage"]["completion_tokens"]
            self.metrics.local_generation(self.config.name, completion_tokens, time.monotonic() - started)
            return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": self.config.name, "choices": choices,
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens}}

        future = asyncio.get_running_loop().run_in_executor(self.executor, generate)
        self._enqueued(future)
        return await future

    async def complete_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamEnd]:
        """``text_completion`` chunks, prompt after prompt (each choice's ``index`` is its prompt's),
        then the usage chunk if asked for, then a ``StreamEnd``."""
        kwargs = self._completion_kwargs(body)
        prompts = items(body["prompt"])
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        counts = [0, 0]  # prompt, completion tokens

        def produce(emit: Any, stop: threading.Event) -> None:
            started = time.monotonic()
            for index, prompt in enumerate(prompts):
                n_prompt = len(prompt) if isinstance(prompt, list) else len(
                    self.llm.tokenize(prompt.encode(), add_bos=True, special=False))
                for chunk in self._stream_one(prompt, kwargs):
                    if stop.is_set():
                        return
                    chunk["choices"][0]["index"] = index
                    chunk["id"], chunk["created"], chunk["model"] = completion_id, created, self.config.name
                    emit(chunk)
                counts[0] += n_prompt
                counts[1] += max(self.llm.n_tokens - n_prompt, 0)  # the context holds prompt + output
            self.metrics.local_generation(self.config.name, counts[1], time.monotonic() - started)

        async for chunk in self._relay_thread(produce):
            yield chunk
        usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": sum(counts)}
        if include_usage:
            yield {"id": completion_id, "object": "text_completion", "created": created, "model": self.config.name,
                   "choices": [], "usage": usage}
        yield StreamEnd(usage=Usage.of(usage))

    async def _relay_thread(self, produce: Any) -> AsyncIterator[dict[str, Any]]:
        """Run ``produce(emit, stop)`` on the generation thread and yield what it emits, as it emits it;
        its PromptfleetError is raised here. Closing this generator sets ``stop`` (the client went away)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                produce(lambda item: loop.call_soon_threadsafe(queue.put_nowait, item), stop)
            except PromptfleetError as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self.executor, run)
        self._enqueued(future)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, PromptfleetError):
                    raise item
                yield item
        finally:
            stop.set()
            if not future.done():
                future.cancel()
