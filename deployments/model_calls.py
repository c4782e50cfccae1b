"""ModelCalls: the one path by which anything calls a model — chat, streams, embeddings, text
completions, task runs, batch lines.

Used by the Gateway's model routes (chat, embeddings, completions), by ``TaskExecutor`` (sync and
async task runs, in the TaskRunner replicas) and by batch jobs' driver processes (``jobs.batch``). Calls the
``ModelWorker`` deployments through a ``Transport`` and meters keys through a ``Meter``.
Owns nothing but per-process caches.

For one call it:

1. resolves the model and its fallback chain (404 ``model_not_found`` naming ``model``; 400 naming
   ``model`` when it lacks the route's capability, ``core.capabilities``; fallback models without it
   are skipped) and checks the request against the model's output limit (400 naming ``max_tokens`` or
   ``max_completion_tokens``);
2. meters the payer key: ``Meter.admit`` (budget, rpm, tpm with a token estimate bounded by the
   model's output limit) before anything is sent;
3. sends a typed ``ModelCall`` — under the request id given, else the id of the request being
   served (``deployments.request_ids``), else a new one — to the first model of the chain, and
   to the next when the answer is an error whose class is ``transient`` (``deployments.errors``),
   before the first byte of the answer; Ray's own failures — backpressure, a replica or node that died with the call in
   flight — become ``Overloaded`` (503 with Retry-After) for that model;
4. records the usage for the payer; a call that was refused, failed or was cancelled settles
   its tpm booking instead.

Embeddings and text completions take the same steps with a ``BodyCall`` to the worker's ``embed``,
``complete`` or ``complete_stream`` (``Transport.send`` / ``open``).

Streams are billed whether or not the client asked for ``include_usage`` and whether or not it
stayed to the end: the worker's ``StreamEnd`` carries the provider's count; when the stream ends
before it (client hung up, error mid-stream), the tokens are counted here from what was relayed
(``core.tokens.StreamCounter``: the larger of text chunks and characters / 4, plus the prompt
estimate) — conservative, so an abandoned stream is never billed less than it plausibly used.

Metrics (``deployments.telemetry``): the tokens of every answered call by model (the numbers it
bills), every fallback taken, and a stream's time to its first chunk.

The seam is ``Transport`` (as httpx's ``BaseTransport``): ``HandleTransport`` sends through Ray
``DeploymentHandle``s; tests give a fake (``tests.fakes.workers.FakeWorkers``) and exercise all
of the above without Ray.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments import request_ids
from deployments.clients.failures import WORKER_GONE, overloaded, unavailable
from deployments.config import Capability, ModelConfig
from deployments.core.capabilities import require_capability
from deployments.core.tokens import StreamCounter, chat_prompt_tokens, completion_budget, reply_tokens
from deployments.errors import InvalidRequest, ModelNotFound, PromptfleetError
from deployments.limits.metering import KeyEntry, Meter
from deployments.schemas import ChatCompletionRequest, ChatReply, Chunks, ModelCall, Share, StreamEnd, Usage
from deployments.schemas.calls import BodyCall
from deployments.schemas.completions import DEFAULT_MAX_TOKENS, CompletionRequest
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.schemas.inputs import item_tokens
from deployments.telemetry import NULL, Metrics

logger = logging.getLogger("ray.serve")

class WorkerStream(Protocol):
    """A worker's streamed answer: ``Chunks`` (lists of chunk dicts: what an upstream delivered
    together, or a local model's chunks one by one), then a ``StreamEnd``, or an error value last."""

    def __anext__(self) -> Awaitable[Any]: ...

    def cancel(self) -> None: ...


class Transport(Protocol):
    """Sends one call to a model's worker. May raise Ray's failures; ``ModelCalls`` maps them."""

    def chat(self, model: str, call: ModelCall) -> Awaitable[Any]: ...

    def stream(self, model: str, call: ModelCall) -> WorkerStream: ...

    def send(self, model: str, method: str, call: BodyCall) -> Awaitable[Any]:
        """A worker's JSON method for the other routes (``embed``, ``complete``)."""
        ...

    def open(self, model: str, method: str, call: BodyCall) -> WorkerStream:
        """A worker's streaming method for the other routes (``complete_stream``)."""
        ...


class HandleTransport:
    """The ``ModelWorker`` deployments, through their Serve handles."""

    def __init__(self, workers: dict[str, DeploymentHandle]) -> None:
        self.workers = workers
        self.streams = {name: handle.options(stream=True) for name, handle in workers.items()}

    def chat(self, model: str, call: ModelCall) -> Awaitable[Any]:
        response: Awaitable[Any] = self.workers[model].chat.remote(call)
        return response

    def stream(self, model: str, call: ModelCall) -> WorkerStream:
        generator: WorkerStream = self.streams[model].chat_stream.remote(call)
        return generator

    def send(self, model: str, method: str, call: BodyCall) -> Awaitable[Any]:
        response: Awaitable[Any] = getattr(self.workers[model], method).remote(call)
        return response

    def open(self, model: str, method: str, call: BodyCall) -> WorkerStream:
        generator: WorkerStream = getattr(self.streams[model], method).remote(call)
        return generator


def unexpected(model: str, value: Any) -> PromptfleetError:
    logger.error("worker of model %r answered an unexpected %s", model, type(value).__name__)
    return PromptfleetError("Internal error.")


class ModelCalls:
    def __init__(
        self, models: Sequence[ModelConfig], transport: Transport, meter: Meter | None = None, metrics: Metrics = NULL
    ) -> None:
        self.models = {m.name: m for m in models}
        self.transport = transport
        self.meter = meter
        self.metrics = metrics

    # -- before the call -------------------------------------------------------------------

    def config(self, model: str, capability: Capability) -> ModelConfig:
        """The config of ``model``: 404 naming ``model`` if there is none, 400 naming it if the model
        does not serve ``capability`` (``core.capabilities``)."""
        config = self.models.get(model)
        if config is None:
            raise ModelNotFound(f"The model '{model}' does not exist.", param="model")
        require_capability(config, capability)
        return config

    def chain(
        self, request: Any, fallbacks: Sequence[str] | None = None, capability: Capability = "chat"
    ) -> list[str]:
        """The models to try, in order (``fallbacks``, e.g. a task's, replace the model's own; those
        lacking ``capability`` are skipped); 400/404 if the request cannot go to its model.
        ``request``: a validated body with ``model`` (and ``effective_max_tokens``/``max_tokens_field``
        for the generating routes)."""
        config = self.config(request.model, capability)
        asked = getattr(request, "effective_max_tokens", None)
        if asked is not None and asked > config.output_limit:
            field = request.max_tokens_field
            raise InvalidRequest(
                f"{field}: model '{request.model}' answers with at most {config.output_limit} tokens "
                f"({asked} asked).",
                param=field,
            )
        chain = config.fallback_models if fallbacks is None else fallbacks
        return [request.model, *(m for m in chain if m in self.models and m != request.model
                                 and capability in self.models[m].capabilities)]

    def wait_s(self, model: str, client_timeout_s: float | None) -> float:
        """How long an HTTP request for ``model`` may wait for its key's rate-limit slot: the client's
        timeout (``gateway.deadline``) or the model's ``admission_wait_s``, capped."""
        if self.meter is None:
            return 0.0
        config = self.models.get(model)
        if config is None:
            return self.meter.wait_s(client_timeout_s)
        return self.meter.wait_s(client_timeout_s, config.admission_wait_s)

    def _share(self, payer: KeyEntry | None, background: bool) -> Share | None:
        return self.meter.share(payer, background) if self.meter is not None else None

    def estimate(self, request: ChatCompletionRequest) -> int:
        """Tokens booked on a key's tpm before the call: bounded by the model's output limit, per choice."""
        limit = self.models[request.model].output_limit
        return chat_prompt_tokens(request) + request.n * completion_budget(request.effective_max_tokens, limit)

    async def _admit(self, payer: KeyEntry | None, tokens: int, wait_s: float) -> int:
        if self.meter is None:
            return 0
        return await self.meter.admit(payer, tokens, wait_s)

    def _refund(self, payer: KeyEntry | None, booked: int) -> None:
        if self.meter is not None:
            self.meter.refund(payer, booked)

    def _record(self, payer: KeyEntry | None, model: str, usage: Usage, booked: int) -> None:
        self.metrics.tokens(model, usage.prompt_tokens, usage.completion_tokens,
                            payer.key.id if payer is not None else None)
        if self.meter is not None:
            self.meter.record(payer, model, usage, booked)

    # -- JSON ------------------------------------------------------------------------------

    async def complete(
        self,
        request: ChatCompletionRequest,
        payer: KeyEntry | None = None,
        *,
        wait_s: float = 0.0,
        request_id: str | None = None,
        fallbacks: Sequence[str] | None = None,
        background: bool = False,
        capability: Capability = "chat",
    ) -> dict[str, Any]:
        """The completion body (``model`` names the model that answered); raises PromptfleetError.

        ``wait_s``: how long the payer's rpm/tpm may make the call wait (0: 429 at once).
        ``background``: an async task run or a batch line, served behind the payer's interactive
        calls in a limited model's fair queue. ``capability``: what the caller's route needs of the
        model (``responses`` for a response made with this chat call)."""
        chain = self.chain(request, fallbacks, capability)
        estimate = self.estimate(request)
        booked = await self._admit(payer, estimate, wait_s)
        call_id = request_id or request_ids.current() or request_ids.new_request_id()
        try:
            reply, model = await self._first_answer(chain, request, call_id, self._share(payer, background))
        except BaseException:
            self._refund(payer, booked)
            raise
        # No count from the provider: count the answer's text ourselves.
        usage = reply.usage or counted(request, reply_tokens(reply.completion))
        self._record(payer, model, usage, booked)
        return reply.completion

    async def _first_answer(
        self, chain: list[str], request: ChatCompletionRequest, call_id: str, share: Share | None
    ) -> tuple[ChatReply, str]:
        async def attempt(model: str, call: Any) -> tuple[bool, Any]:
            result = await self.transport.chat(model, call)
            return isinstance(result, ChatReply), result

        reply, model = await self._along(chain, _chat_calls(request, call_id, share), attempt)
        return reply, model

    async def _along(
        self,
        chain: list[str],
        build: Callable[[str], Any],
        attempt: Callable[[str, Any], Awaitable[tuple[bool, Any]]],
    ) -> tuple[Any, str]:
        """Try ``attempt`` with the call ``build(model)`` on each model of ``chain`` until one answers
        (``(True, answer)``); go on after an error whose class is transient, raise any other (and the
        last model's)."""
        for index, model in enumerate(chain):
            call = build(model)
            try:
                answered, result = await attempt(model, call)
            except BackPressureError:
                answered, result = False, overloaded(model)
            except WORKER_GONE:
                answered, result = False, unavailable(model)
            if answered:
                return result, model
            if not isinstance(result, PromptfleetError):
                result = unexpected(model, result)
            if index == len(chain) - 1 or not result.transient:
                try:
                    raise result
                finally:
                    # The error's traceback holds this frame: a local naming the error would make a
                    # reference cycle, which only the collector frees (41 objects a refused call).
                    del result
            self.metrics.fallback(model, chain[index + 1], result.code)
            logger.warning("model %s failed (%s); falling back to %s", model, result.code, chain[index + 1])
        raise AssertionError("unreachable")

    # -- streaming -------------------------------------------------------------------------

    async def stream(
        self,
        request: ChatCompletionRequest,
        payer: KeyEntry | None = None,
        *,
        wait_s: float = 0.0,
        request_id: str | None = None,
        background: bool = False,
        capability: Capability = "chat",
    ) -> AsyncGenerator[Chunks | PromptfleetError, None]:
        """Open the stream; errors before its first chunk raise (so they get their status code, or
        a fallback). Returns the chunks to relay in ``Chunks`` as the worker sent them (relay each
        list as one write), ending with an error value if one happens later. The usage is recorded
        when the returned iterator ends, however it ends."""
        started = time.monotonic()
        chain = self.chain(request, capability=capability)
        estimate = self.estimate(request)
        booked = await self._admit(payer, estimate, wait_s)
        call_id = request_id or request_ids.current() or request_ids.new_request_id()
        try:
            chunks, first, model = await self._open(
                chain, _chat_calls(request, call_id, self._share(payer, background)), self.transport.stream)
        except BaseException:
            self._refund(payer, booked)
            raise
        self.metrics.first_token(model, time.monotonic() - started)
        return self._relay(chunks, first, model, lambda: chat_prompt_tokens(request), payer, booked)

    async def _open(
        self, chain: list[str], build: Callable[[str], Any], open_stream: Callable[[str, Any], WorkerStream]
    ) -> tuple[WorkerStream, Any, str]:
        """Start the stream (``open_stream(model, build(model))``) on the first model of ``chain`` whose
        first item is not an error."""

        async def attempt(model: str, call: Any) -> tuple[bool, Any]:
            chunks = open_stream(model, call)
            try:
                first: Any = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                chunks.cancel()
                raise
            if isinstance(first, (list, StreamEnd)):
                return True, (chunks, first)
            chunks.cancel()
            return False, first

        (chunks, first), model = await self._along(chain, build, attempt)
        return chunks, first, model

    async def _relay(
        self,
        chunks: WorkerStream,
        first: Any,
        model: str,
        prompt: Callable[[], int],
        payer: KeyEntry | None,
        booked: int,
    ) -> AsyncGenerator[Chunks | PromptfleetError, None]:
        """Relay a stream's ``Chunks`` as they came; record its usage at the end (counted from what was
        relayed, with the ``prompt()`` estimate, when the worker's ``StreamEnd`` did not come)."""
        counter = StreamCounter()
        usage: Usage | None = None
        item = first
        try:
            while True:
                if isinstance(item, StreamEnd):
                    usage = item.usage
                    return
                if isinstance(item, PromptfleetError):
                    yield item  # the error event ends the stream
                    return
                if not isinstance(item, list):
                    yield unexpected(model, item)
                    return
                for chunk in item:
                    counter.add(chunk)
                yield item
                try:
                    item = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except (BackPressureError, *WORKER_GONE):
                    item = unavailable(model)
        finally:
            # Finished, failed, or the client went away (the consumer closed us): stop the worker's
            # generation, then bill what was produced.
            chunks.cancel()
            self._record(payer, model, usage or estimated(prompt(), counter.completion_tokens), booked)

    # -- the other routes: embeddings, text completions -------------------------------------
    # The same steps as chat (capability and chain, admission, fallbacks, Ray failures, usage),
    # with a ``BodyCall`` to the worker's ``method``.

    async def embed(
        self, request: EmbeddingRequest, payer: KeyEntry | None = None, *, wait_s: float = 0.0,
        request_id: str | None = None, background: bool = False,
    ) -> dict[str, Any]:
        """The embedding response for ``request`` (``model`` names the model that answered)."""
        chain = self.chain(request, capability="embeddings")
        return await self._json(chain, "embed", request, request.estimate(), payer, wait_s, request_id, background)

    async def text_complete(
        self, request: CompletionRequest, payer: KeyEntry | None = None, *, wait_s: float = 0.0,
        request_id: str | None = None, background: bool = False,
    ) -> dict[str, Any]:
        """The ``text_completion`` for ``request``."""
        chain = self.chain(request, capability="completions")
        return await self._json(chain, "complete", request, self.completion_estimate(request), payer, wait_s,
                                request_id, background)

    async def text_stream(
        self, request: CompletionRequest, payer: KeyEntry | None = None, *, wait_s: float = 0.0,
        request_id: str | None = None, background: bool = False,
    ) -> AsyncGenerator[Chunks | PromptfleetError, None]:
        """Open a /v1/completions stream, as ``stream`` does for chat."""
        started = time.monotonic()
        chain = self.chain(request, capability="completions")
        booked = await self._admit(payer, self.completion_estimate(request), wait_s)
        call_id = request_id or request_ids.current() or request_ids.new_request_id()
        build = _body_calls(request, call_id, self._share(payer, background))
        try:
            chunks, first, model = await self._open(
                chain, build, lambda model, call: self.transport.open(model, "complete_stream", call))
        except BaseException:
            self._refund(payer, booked)
            raise
        self.metrics.first_token(model, time.monotonic() - started)
        return self._relay(chunks, first, model, lambda: sum(item_tokens(p) for p in request.prompts()), payer,
                           booked)

    def completion_estimate(self, request: CompletionRequest) -> int:
        """Tokens booked before a /v1/completions call: its prompts and each one's output, bounded."""
        limit = self.models[request.model].output_limit
        prompts = request.prompts()
        per_prompt = completion_budget(request.max_tokens or DEFAULT_MAX_TOKENS, limit)
        return sum(item_tokens(p) for p in prompts) + per_prompt * len(prompts) * request.n

    async def _json(
        self, chain: list[str], method: str, request: EmbeddingRequest | CompletionRequest, estimate: int,
        payer: KeyEntry | None, wait_s: float, request_id: str | None, background: bool,
    ) -> dict[str, Any]:
        booked = await self._admit(payer, estimate, wait_s)
        call_id = request_id or request_ids.current() or request_ids.new_request_id()

        async def attempt(model: str, call: BodyCall) -> tuple[bool, Any]:
            result = await self.transport.send(model, method, call)
            return isinstance(result, ChatReply), result

        try:
            reply, model = await self._along(chain, _body_calls(request, call_id, self._share(payer, background)),
                                             attempt)
        except BaseException:
            self._refund(payer, booked)
            raise
        usage = reply.usage or _body_usage(reply.completion, estimate)
        self._record(payer, model, usage, booked)
        return dict(reply.completion)


def _body_calls(
    request: EmbeddingRequest | CompletionRequest, call_id: str, share: Share | None
) -> Callable[[str], BodyCall]:
    """The call for each model of a chain: the body as the client set it, named for that model."""
    body = request.model_dump(exclude_unset=True, exclude_none=True)
    return lambda model: BodyCall.model_construct(body={**body, "model": model}, request_id=call_id, share=share)


def _body_usage(answer: dict[str, Any], estimate: int) -> Usage:
    """The usage of an embedding or completion answer whose ``usage`` lacks completion tokens (an
    embedding response has only ``prompt_tokens``); the estimate when it has none at all."""
    usage = answer.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        completion = usage.get("completion_tokens")
        return estimated(usage["prompt_tokens"], completion if isinstance(completion, int) else 0)
    if answer.get("object") == "text_completion":
        completion = reply_tokens(answer)
        return estimated(max(estimate - completion, 0), completion)
    return estimated(estimate, 0)


def counted(request: ChatCompletionRequest, completion_tokens: int) -> Usage:
    """Usage counted on our side (the provider gave none): prompt estimate plus ``completion_tokens``."""
    return estimated(chat_prompt_tokens(request), completion_tokens)


def estimated(prompt: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def _chat_calls(request: ChatCompletionRequest, call_id: str, share: Share | None) -> Callable[[str], ModelCall]:
    """The chat call for each model of a chain."""
    return lambda model: ModelCall(request=_for_model(request, model), request_id=call_id, share=share)


def _for_model(request: ChatCompletionRequest, model: str) -> ChatCompletionRequest:
    """The request as sent to ``model`` (a fallback gets its own name)."""
    return request if request.model == model else request.model_copy(update={"model": model})
