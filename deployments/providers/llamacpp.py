"""Provider for a local GGUF model run by llama.cpp (llama-cpp-python's bindings).

A generating model decodes with continuous batching (``llamacpp_decode.Decoder``): one thread owns
a llama.cpp context of ``slots`` sequences and decodes every running request's next token in one
``llama_decode``; requests beyond the slots wait in arrival order. Tokens reach the event loop as
they are sampled; when the consumer goes away (client disconnected, generator closed) the request's
slot is freed before the next step, so an abandoned stream does not keep the CPU busy.

Prompts are the model's own chat template (its GGUF ``tokenizer.chat_template``, rendered by
llama-cpp-python's ``Jinja2ChatFormatter``; ChatML for a GGUF without one). ``response_format``
``json_object`` / ``json_schema`` become a llama.cpp grammar (llama-cpp-python compiles the JSON
Schema), so the output parses. A schema whose grammar would crash llama.cpp is a 400
(``core.grammar``). ``core.localchat`` decides what a body asks of the model (a field it cannot
honour is a 400 naming it; ``n`` choices are ``n`` generations with successive seeds, decoded side
by side); ``core.toolcalls`` holds function calls to a grammar and turns the answer, or the streamed
text, into OpenAI's ``tool_calls``. ``logprobs`` / ``top_logprobs`` come from the sampled position's
logits (``llamacpp_sampling``), in OpenAI's ``choices[].logprobs.content[]``.

An embedding model (``capabilities: [embeddings]``) has no decoder: its requests run one at a time
on a single thread (``llamacpp_embed``).

Metrics: requests queued or running on the model (``promptfleet_local_queue_length``), and the
tokens and busy seconds of the decoder's steps (tokens per second, on the dashboard).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deployments.config import LlamaCppModel
from deployments.core import toolcalls
from deployments.core.grammar import GENERATION_STACK_BYTES
from deployments.core.localchat import LocalChat
from deployments.core.structured import schema_problems
from deployments.errors import InvalidRequest
from deployments.providers import llamacpp_embed
from deployments.providers.llamacpp_decode import Decoder, Finished, Job, Piece
from deployments.providers.llamacpp_sampling import Sampling
from deployments.providers.llamacpp_text import LlamaCppCompletions, refuse_unknown
from deployments.schemas import Share, StreamEnd, Usage
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.schemas.inputs import items
from deployments.telemetry import NULL, Metrics

logger = logging.getLogger("ray.serve")

# llama.cpp's ``enum llama_pooling_type`` (-1: the model's own default, for generating models).
POOLING = {"mean": 1, "cls": 2, "last": 3}
# llama-cpp-python's ``create_chat_completion`` defaults, which chat requests have always had.
CHAT_TEMPERATURE = 0.2
TOP_P = 0.95
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


class LlamaCppProvider(LlamaCppCompletions):
    def __init__(self, config: LlamaCppModel, model_path: Path, metrics: Metrics = NULL) -> None:
        from llama_cpp import Llama  # heavy import, only in worker replicas

        self.config = config
        self.metrics = metrics
        self.queued = 0  # requests submitted and not finished (event loop only)
        metrics.local_queue(config.name, 0)
        # An embedding model (``capabilities: [embeddings]``) gets llama.cpp's embedding context, which
        # pools instead of producing logits; it generates nothing (the config forbids other capabilities).
        self.embedding = "embeddings" in config.capabilities
        self.llm = Llama(
            model_path=str(model_path),
            # A generating model decodes in the Decoder's context; Llama's own is only the smallest.
            n_ctx=config.n_ctx if self.embedding else 256,
            n_threads=config.n_threads,
            n_threads_batch=config.n_threads,
            n_batch=config.n_batch if self.embedding else 32,
            # Pooled embeddings need a whole input in one physical batch.
            n_ubatch=config.n_batch if self.embedding else 32,
            seed=config.seed,
            verbose=False,
            embedding=self.embedding,
            pooling_type=POOLING[config.pooling] if self.embedding else -1,
        )
        if self.embedding:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.name}")
            # llama.cpp's recursion gets the same room as on the decoder thread (``core.grammar``);
            # the stack size applies to threads started while it is set, so start the one thread now.
            previous = threading.stack_size(GENERATION_STACK_BYTES)
            try:
                self.executor.submit(lambda: None).result()
            finally:
                threading.stack_size(previous)
            return
        self.formatter = _formatter(self.llm)
        self.decoder = Decoder(self.llm, slots=config.slots, n_ctx=config.n_ctx, n_batch=config.n_batch,
                               n_threads=config.n_threads, name=config.name,
                               cache_types=(config.cache_type_k, config.cache_type_v),
                               record=lambda tokens, seconds: metrics.local_generation(config.name, tokens, seconds))

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Count a request as queued or running while it lasts (the decoder records tokens and busy time)."""
        self.queued += 1
        self.metrics.local_queue(self.config.name, self.queued)
        try:
            yield
        finally:
            self.queued -= 1
            self.metrics.local_queue(self.config.name, self.queued)

    def _plan(self, body: dict[str, Any]) -> LocalChat:
        """The generations ``body`` asks for; 400 naming a field this model cannot honour."""
        return LocalChat.of(body, self.config)

    def _chat_prompt(self, chat: LocalChat) -> tuple[list[int], list[str]]:
        """The prompt's tokens and the template's stop strings; 400s for a schema llama.cpp cannot
        hold and for a prompt that does not fit the context."""
        kwargs = chat.kwargs[0]
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
        rendered = self.formatter(messages=kwargs["messages"])
        prompt = self.llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        if len(prompt) >= self.config.n_ctx:
            raise InvalidRequest(f"The messages are {len(prompt)} tokens; model '{self.config.name}' has a "
                                 f"context of {self.config.n_ctx} tokens.", param="messages")
        stop = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop] if rendered.stop else []
        return prompt, stop

    def _chat_job(self, kwargs: dict[str, Any], prompt: list[int], stop: list[str], grammar: str | None,
                  until_text: bool = False) -> Job:
        asked = kwargs.get("stop")
        sampling = Sampling(
            temperature=kwargs.get("temperature", CHAT_TEMPERATURE), top_p=kwargs.get("top_p", TOP_P),
            presence_penalty=kwargs.get("presence_penalty", 0.0),
            frequency_penalty=kwargs.get("frequency_penalty", 0.0), seed=kwargs["seed"], grammar=grammar)
        return Job(prompt, sampling, kwargs["max_tokens"], ([asked] if isinstance(asked, str) else asked or []) + stop,
                   top_logprobs=None if until_text else kwargs.get("top_logprobs"), until_text=until_text)

    async def _choice_job(self, chat: LocalChat, kwargs: dict[str, Any], prompt: list[int], stop: list[str]) -> Job:
        """The job of one choice: under the plan's grammar — for ``auto``, the call's when the model,
        unconstrained, opens its answer with ``{`` (its slot keeps the prompt for the answer)."""
        if chat.tools.probes:
            probe = self._chat_job(kwargs, prompt, stop, None, until_text=True)
            text, _, _ = await collect(self.decoder, probe)
            grammar = chat.tools.call_gbnf() if text.lstrip().startswith("{") else None
        else:
            grammar = chat.tools.gbnf() or _format_grammar(kwargs.get("response_format"))
        return self._chat_job(kwargs, prompt, stop, grammar)

    async def _answer(self, chat: LocalChat, index: int, prompt: list[int], stop: list[str],
                      counts: list[int]) -> dict[str, Any]:
        kwargs = chat.kwargs[index]
        job = await self._choice_job(chat, kwargs, prompt, stop)
        text, logprobs, finished = await collect(self.decoder, job)
        counts[index] = finished.completion_tokens
        choice = {"index": index, "message": {"role": "assistant", "content": text},
                  "logprobs": {"content": logprobs} if job.top_logprobs is not None else None,
                  "finish_reason": finished.reason}
        return toolcalls.as_tool_call(choice, chat.tools)

    async def chat(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        # ``share`` is for shared upstream budgets; a local model has none.
        chat = self._plan(body)
        prompt, stop = self._chat_prompt(chat)
        counts = [0] * len(chat.kwargs)
        with self._request():
            choices = await asyncio.gather(*(self._answer(chat, i, prompt, stop, counts)
                                             for i in range(len(chat.kwargs))))
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(counts),
                 "total_tokens": len(prompt) + sum(counts)}
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.config.name, "choices": list(choices), "usage": usage}

    async def stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[dict[str, Any] | StreamEnd]:
        chat = self._plan(body)
        prompt, stop = self._chat_prompt(chat)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.config.name}
        counts = [0] * len(chat.kwargs)
        with self._request():
            # Choices one after another, as OpenAI's chunks of a choice come in order.
            for index, kwargs in enumerate(chat.kwargs):
                job = await self._choice_job(chat, kwargs, prompt, stop)
                async with contextlib.aclosing(self._stream_choice(index, job, chat, counts)) as chunks:
                    async for chunk in chunks:
                        yield {**head, **chunk}
        usage = {"prompt_tokens": len(prompt), "completion_tokens": sum(counts),
                 "total_tokens": len(prompt) + sum(counts)}
        if include_usage:
            yield {**head, "choices": [], "usage": usage}
        yield StreamEnd(usage=Usage.of(usage))

    async def _stream_choice(self, index: int, job: Job, chat: LocalChat,
                             counts: list[int]) -> AsyncGenerator[dict[str, Any], None]:
        """Choice ``index`` as OpenAI chunks (text, or tool-call deltas, with their logprobs)."""
        calls = toolcalls.CallStream(chat.tools)
        wanted = job.top_logprobs is not None

        def chunk(delta: dict[str, Any], logprobs: list[dict[str, Any]] | None = None,
                  finish_reason: str | None = None) -> dict[str, Any]:
            return {"choices": [{"index": index, "delta": delta,
                                 "logprobs": {"content": logprobs or []} if wanted else None,
                                 "finish_reason": finish_reason}]}

        yield chunk({"role": "assistant", "content": "" if not chat.tools.calls else None})
        async with contextlib.aclosing(self.decoder.run(job)) as items:
            async for item in items:
                if isinstance(item, Piece):
                    deltas = calls.feed(item.text)
                    if item.logprobs and not deltas:
                        deltas = [{}]  # the text is held back (a call being read): its logprobs go now
                    for number, delta in enumerate(deltas):
                        yield chunk(delta, item.logprobs if number == 0 else None)
                else:
                    counts[index] = item.completion_tokens
                    pieces, reason = calls.finish(item.reason)
                    for piece in pieces:
                        yield chunk(piece)
                    yield chunk({}, None, reason)

    async def close(self) -> None:
        if self.embedding:
            self.executor.shutdown(wait=False, cancel_futures=True)
        else:
            await asyncio.get_running_loop().run_in_executor(None, self.decoder.close)

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
            sequences = llamacpp_embed.tokenize(self.llm, inputs, n_batch, self.config.name)
            vectors = llamacpp_embed.embed(self.llm, sequences, n_batch, self.llm.context_params.n_seq_max)
            return vectors, sum(len(s) for s in sequences)

        def timed() -> tuple[Any, int]:
            started = time.monotonic()
            try:
                return compute()
            finally:
                self.metrics.local_generation(self.config.name, 0, time.monotonic() - started)

        with self._request():
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(self.executor, timed)
        return {
            "object": "list",
            "data": llamacpp_embed.encode(vectors, body.get("encoding_format") or "float"),
            "model": self.config.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


async def collect(decoder: Decoder, job: Job) -> tuple[str, list[dict[str, Any]], Finished]:
    """The whole text of ``job``, its logprob entries and how it finished."""
    text: list[str] = []
    logprobs: list[dict[str, Any]] = []
    async with contextlib.aclosing(decoder.run(job)) as items:
        async for item in items:
            if isinstance(item, Finished):
                return "".join(text), logprobs, item
            text.append(item.text)
            logprobs.extend(item.logprobs)
    raise RuntimeError("the decoder ended a job without finishing it")


def _format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """``response_format``'s grammar, as llama-cpp-python's chat handler made it (a schema it cannot
    convert falls back to any JSON; ``core.grammar`` has refused the ones that would crash)."""
    if not response_format or response_format.get("type") != "json_object":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if "schema" in response_format:
        try:
            gbnf: str = json_schema_to_gbnf(json.dumps(response_format["schema"]))
            return gbnf
        except Exception:
            logger.info("a response_format schema fell back to any JSON", exc_info=True)
    return JSON_GBNF


def _formatter(llm: Any) -> Any:
    """The model's chat template as llama-cpp-python renders it (ChatML if the GGUF has none)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos, bos = llm.token_eos(), llm.token_bos()
    return Jinja2ChatFormatter(
        template=llm.metadata.get("tokenizer.chat_template") or CHATML,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
