"""Provider for a local GGUF model run by llama-cpp-python.

A llama.cpp context is not thread-safe and generation is CPU-bound, so every
generation runs on one dedicated thread (a single-worker executor): requests
queue in arrival order and the event loop stays free. Streaming hands tokens
from that thread to the loop through an asyncio queue; when the consumer goes
away (client disconnected, generator closed) a flag stops generation at the
next token, so an abandoned stream does not keep the CPU busy.

``response_format`` ``json_object`` / ``json_schema`` become a llama.cpp
grammar (llama-cpp-python compiles the JSON Schema), so the output parses. A schema whose grammar
would crash llama.cpp is a 400 (``core.grammar``). ``core.localchat`` decides what a body asks of
the model (a field it cannot honour is a 400 naming it; ``n`` choices are ``n`` generations with
successive seeds); ``core.toolcalls`` holds function calls to a grammar and turns the answer, or
the streamed text, into OpenAI's ``tool_calls``.

Metrics: generations queued or running on the thread (``promptfleet_local_queue_length``), and
the completion tokens and seconds of each generation (tokens per second, on the dashboard).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deployments.config import LlamaCppModel
from deployments.core import toolcalls
from deployments.core.grammar import GENERATION_STACK_BYTES
from deployments.core.localchat import LocalChat
from deployments.core.structured import schema_problems
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.providers import llamacpp_embed
from deployments.providers.llamacpp_text import LlamaCppCompletions, refuse_unknown
from deployments.schemas import Share, StreamEnd, Usage
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.schemas.inputs import items
from deployments.telemetry import NULL, Metrics

logger = logging.getLogger("ray.serve")

_DONE = object()

# llama.cpp's ``enum llama_pooling_type`` (-1: the model's own default, for generating models).
POOLING = {"mean": 1, "cls": 2, "last": 3}


class LlamaCppProvider(LlamaCppCompletions):
    def __init__(self, config: LlamaCppModel, model_path: Path, metrics: Metrics = NULL) -> None:
        from llama_cpp import Llama  # heavy import, only in worker replicas

        self.config = config
        self.metrics = metrics
        self.queued = 0  # generations submitted to the thread and not finished (event loop only)
        metrics.local_queue(config.name, 0)
        # An embedding model (``capabilities: [embeddings]``) gets llama.cpp's embedding context, which
        # pools instead of producing logits; it generates nothing (the config forbids other capabilities).
        self.embedding = "embeddings" in config.capabilities
        self.llm = Llama(
            model_path=str(model_path),
            n_ctx=config.n_ctx,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads,
            n_batch=config.n_batch,
            # Pooled embeddings need a whole input in one physical batch.
            n_ubatch=config.n_batch if self.embedding else 512,
            seed=config.seed,
            verbose=False,
            embedding=self.embedding,
            pooling_type=POOLING[config.pooling] if self.embedding else -1,
        )
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.name}")
        # llama.cpp parses grammars recursively on this thread: give it room (``core.grammar``).
        # The stack size applies to threads started while it is set, so start the one thread now.
        previous = threading.stack_size(GENERATION_STACK_BYTES)
        try:
            self.executor.submit(lambda: None).result()
        finally:
            threading.stack_size(previous)

    def _plan(self, body: dict[str, Any]) -> LocalChat:
        """The generations ``body`` asks for; 400 naming a field this model cannot honour."""
        return LocalChat.of(body, self.config)

    def _check_fits(self, kwargs: dict[str, Any]) -> None:
        schema = (kwargs.get("response_format") or {}).get("schema")
        if schema is not None:
            # What the grammar cannot hold the model to (`not`, `if`, …) would be dropped silently, and
            # what would crash llama.cpp kills the worker: both are the client's 400.
            errors = [(path, message) for path, message, warning in schema_problems(schema, "llamacpp")
                      if not warning]
            if errors:
                path, message = errors[0]
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
                raise InvalidRequest(f"The response_format schema cannot be used with model '{self.config.name}': "
                                     f"{message}.", param=f"response_format.json_schema.schema{where}")
        # llama.cpp raises a ValueError deep inside generation when the prompt does not fit;
        # count first so the client gets a 400 naming `messages`.
        text = "".join(str(m["content"]) for m in kwargs["messages"])
        n_prompt = len(self.llm.tokenize(text.encode(), add_bos=False, special=True))
        if n_prompt + 16 > self.config.n_ctx:
            raise InvalidRequest(
                f"The messages are about {n_prompt} tokens; model '{self.config.name}' has a "
                f"context of {self.config.n_ctx} tokens.",
                param="messages",
            )

    def _enqueued(self, future: asyncio.Future[Any]) -> None:
        """Count a generation submitted to the thread until it has finished (or was cancelled)."""
        self.queued += 1
        self.metrics.local_queue(self.config.name, self.queued)
        future.add_done_callback(self._dequeued)

    def _dequeued(self, _: object) -> None:
        self.queued -= 1
        self.metrics.local_queue(self.config.name, self.queued)

    @staticmethod
    def _grammar(gbnf: str | None) -> dict[str, Any]:
        """The kwargs of a grammar (built on the generation thread: llama.cpp parses grammars
        recursively, and that thread has the stack for it)."""
        if gbnf is None:
            return {}
        from llama_cpp.llama_grammar import LlamaGrammar

        return {"grammar": LlamaGrammar.from_string(gbnf, verbose=False)}

    def _opens_call(self, kwargs: dict[str, Any]) -> bool:
        """``tool_choice: auto``: whether the model, unconstrained, starts its answer with ``{`` (a
        call). Generates only up to its first non-blank text; the prompt stays in llama.cpp's cache
        for the generation that follows (same seed, so a text answer starts the same way again)."""
        probe: Iterator[dict[str, Any]] = self.llm.create_chat_completion(**kwargs, stream=True)  # type: ignore[assignment]
        text = ""
        try:
            for chunk in probe:
                choices = chunk.get("choices") or [{}]
                text += (choices[0].get("delta") or {}).get("content") or ""
                if text.strip():
                    break
        finally:
            close = getattr(probe, "close", None)
            if close is not None:
                close()
        return text.lstrip().startswith("{")

    def _choice_grammar(self, kwargs: dict[str, Any], chat: LocalChat) -> dict[str, Any]:
        """The grammar one choice is generated under: the plan's, or for ``auto`` the call's when
        the model opens a call."""
        if chat.tools.probes:
            return self._grammar(chat.tools.call_gbnf() if self._opens_call(kwargs) else None)
        return self._grammar(chat.tools.gbnf())

    def _generate(self, chat: LocalChat) -> dict[str, Any]:
        """All of the body's choices, one generation after another."""
        self._check_fits(chat.kwargs[0])
        started = time.monotonic()
        choices: list[dict[str, Any]] = []
        prompt = completion = 0
        result: dict[str, Any] = {}
        for index, kwargs in enumerate(chat.kwargs):
            try:
                extra = self._choice_grammar(kwargs, chat)
                result = self.llm.create_chat_completion(**kwargs, **extra)  # type: ignore[assignment]
            except ValueError as exc:
                # llama.cpp's ValueErrors are about the prompt not fitting; its text stays in our logs.
                logger.info("llama.cpp rejected a request: %s", exc)
                raise InvalidRequest(
                    f"The request does not fit the context of model '{self.config.name}'.", param="messages"
                ) from None
            usage = result.get("usage") or {}
            prompt = prompt or int(usage.get("prompt_tokens") or 0)
            completion += int(usage.get("completion_tokens") or 0)
            choice = toolcalls.as_tool_call(result["choices"][0], chat.tools)
            choices.append({**choice, "index": index})
        self.metrics.local_generation(self.config.name, completion, time.monotonic() - started)
        result["choices"] = choices
        result["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                           "total_tokens": prompt + completion}
        return result

    async def chat(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        # ``share`` is for shared upstream budgets; a local model has none.
        chat = self._plan(body)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._generate, chat)
        self._enqueued(future)
        result = await future
        result["model"] = self.config.name
        return result

    async def stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamEnd]:
        chat = self._plan(body)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def produce() -> None:
            try:
                self._check_fits(chat.kwargs[0])
                started = time.monotonic()
                n_prompt = n_completion = 0
                for index, kwargs in enumerate(chat.kwargs):
                    if stop.is_set():
                        break
                    extra = self._choice_grammar(kwargs, chat)
                    tokens = self._stream_choice(index, {**kwargs, **extra, "stream": True}, chat, stop, put)
                    n_completion += tokens
                    n_prompt = n_prompt or max(self.llm.n_tokens - tokens, 0)
                self.metrics.local_generation(self.config.name, n_completion, time.monotonic() - started)
                put(("usage", {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                               "total_tokens": n_prompt + n_completion}))
            except PromptfleetError as exc:
                put(exc)
            except ValueError as exc:
                logger.info("llama.cpp rejected a request: %s", exc)
                put(InvalidRequest(
                    f"The request does not fit the context of model '{self.config.name}'.", param="messages"
                ))
            finally:
                put(_DONE)

        future = loop.run_in_executor(self.executor, produce)
        self._enqueued(future)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, PromptfleetError):
                    raise item
                if isinstance(item, tuple):
                    if include_usage:
                        yield {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": self.config.name, "choices": [], "usage": item[1]}
                    yield StreamEnd(usage=Usage.of(item[1]))
                    continue
                item["id"], item["created"], item["model"] = completion_id, created, self.config.name
                yield item
        finally:
            stop.set()
            if not future.done():
                future.cancel()  # still queued behind another generation: never starts

    def _stream_choice(
        self, index: int, kwargs: dict[str, Any], chat: LocalChat, stop: threading.Event, put: Any
    ) -> int:
        """Stream choice ``index`` as OpenAI chunks (text, or tool-call deltas); its token count."""
        calls = toolcalls.CallStream(chat.tools)
        chunks: Iterator[dict[str, Any]] = self.llm.create_chat_completion(**kwargs)  # type: ignore[assignment]
        n_completion = 0

        def emit(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            put({"object": "chat.completion.chunk",
                 "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        for chunk in chunks:
            if stop.is_set():
                break
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            delta = choice.get("delta") or {}
            if delta.get("role"):
                emit({"role": delta["role"], "content": "" if not chat.tools.calls else None})
            if delta.get("content"):
                n_completion += 1  # llama.cpp streams one token per content chunk
                for piece in calls.feed(delta["content"]):
                    emit(piece)
            if choice.get("finish_reason"):
                pieces, reason = calls.finish(choice["finish_reason"])
                for piece in pieces:
                    emit(piece)
                emit({}, reason)
        return n_completion

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # -- embeddings (``capabilities: [embeddings]``) -------------------------------------------

    async def embed(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """An OpenAI embedding response for ``body`` (a validated ``EmbeddingRequest``): all its inputs
        in llama.cpp batches of ``n_batch`` tokens (``llamacpp_embed``), on the generation thread."""
        refuse_unknown(body, EmbeddingRequest, self.config.name)
        n_embd = self.llm.n_embd()
        dimensions = body.get("dimensions")
        if dimensions is not None and dimensions != n_embd:
            raise InvalidRequest(f"dimensions: model '{self.config.name}' makes vectors of {n_embd} dimensions "
                                 "and cannot shorten them.", param="dimensions")
        n_batch = self.config.n_batch
        inputs = items(body["input"])

        def compute() -> tuple[Any, int]:
            started = time.monotonic()
            sequences = llamacpp_embed.tokenize(self.llm, inputs, n_batch, self.config.name)
            vectors = llamacpp_embed.embed(self.llm, sequences, n_batch, self.llm.context_params.n_seq_max)
            tokens = sum(len(s) for s in sequences)
            self.metrics.local_generation(self.config.name, 0, time.monotonic() - started)
            return vectors, tokens

        future = asyncio.get_running_loop().run_in_executor(self.executor, compute)
        self._enqueued(future)
        vectors, tokens = await future
        return {
            "object": "list",
            "data": llamacpp_embed.encode(vectors, body.get("encoding_format") or "float"),
            "model": self.config.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
