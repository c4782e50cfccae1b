"""ResponseCalls: /v1/responses on the one model-call path (``deployments.model_calls``).

Used by the Gateway's Responses route and by batch drivers' ``/v1/responses`` lines (``jobs.batch``).
It takes ``ModelCalls``' steps — the chain (capability ``responses``, the model's output limit on
``max_output_tokens``, its fallbacks), admission and metering of the payer, the request id, Ray's
failures, fallbacks on transient errors, metrics — and sends each model of the chain one of two calls:

- a model whose upstream speaks the Responses API (``upstream_api: responses``) gets the body as the
  client sent it (``core.responses.forwarded``: unknown fields too, ``store: false``) through the
  worker's ``respond`` / ``respond_stream``; the ``response`` object, or the stream's events, come back
  as the upstream made them and are relayed unchanged (``model`` named as configured);
- any other model gets the chat request the body translates to (``core.responses.to_chat``) through
  the worker's ``chat`` / ``chat_stream``, and its completion or chunks are translated back
  (``from_chat``, ``ResponseEvents``).

So a forwarding model that fails (a 500, a timeout) falls back to a chat-only model, translated. A
fallback the request cannot go to — a field only the Responses API has (``reasoning``) for a chat
model, a stateful field for a forwarding one — is skipped; for the model asked for it is a 400 naming
the field. The key's tpm estimate is the body's (``core.tokens.response_prompt_tokens``: input, tools,
format schema) plus its output limit; the usage billed is the upstream's (a stream's from its
``response.completed``), else counted from what was answered. An error naming a chat field is renamed
to the Responses field the client sent (``core.responses.param_of``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from deployments import request_ids
from deployments.config import OpenAIModel
from deployments.core import responses
from deployments.core.tokens import (
    chat_prompt_tokens,
    completion_budget,
    reply_tokens,
    response_prompt_tokens,
    text_tokens,
)
from deployments.errors import InvalidRequest, PromptfleetError
from deployments.limits.metering import KeyEntry
from deployments.model_calls import ModelCalls, WorkerStream, estimated
from deployments.schemas import ChatCompletionRequest, ChatReply, Chunks, ModelCall, Share
from deployments.schemas.calls import BodyCall
from deployments.schemas.responses import ResponseCreate

# A streamed response's events in lists (each list one write to the client), an error value last.
Events = AsyncGenerator[Chunks | PromptfleetError, None]


@dataclass
class Plan:
    """How one request goes to each model of its chain."""

    chain: list[str]
    forwarding: set[str] = field(default_factory=set)  # models sent the body itself
    body: dict[str, Any] | None = None  # the forwarded body (None: no model of the chain forwards)
    chat: ChatCompletionRequest | None = None  # the translated request (None: every model forwards)
    prompt: int = 0  # the prompt estimate

    def call(self, model: str, call_id: str, share: Share | None) -> BodyCall | ModelCall:
        if model in self.forwarding:
            assert self.body is not None
            return BodyCall.model_construct(body={**self.body, "model": model}, request_id=call_id, share=share)
        assert self.chat is not None
        request = self.chat if self.chat.model == model else self.chat.model_copy(update={"model": model})
        return ModelCall(request=request, request_id=call_id, share=share)


class ResponseCalls:
    def __init__(self, calls: ModelCalls) -> None:
        self.calls = calls

    def forwards(self, model: str) -> bool:
        config = self.calls.models.get(model)
        return isinstance(config, OpenAIModel) and config.forwards_responses

    def plan(self, body: ResponseCreate) -> Plan:
        """The chain and each model's call; 400/404 if the request cannot go to the model it names."""
        chain = self.calls.chain(body, capability="responses")
        forwarding = {m for m in chain if self.forwards(m)}
        plan = Plan(chain=chain, forwarding=forwarding)
        if forwarding:
            plan.body = _or_none(lambda: responses.forwarded(body), raise_it=chain[0] in forwarding)
        if len(forwarding) < len(chain):
            plan.chat = _or_none(lambda: responses.to_chat(body), raise_it=chain[0] not in forwarding)
        plan.chain = [m for m in chain if (plan.body if m in forwarding else plan.chat) is not None]
        # The forwarded body's own estimate, else the translated request's (no second dump of the body).
        plan.prompt = response_prompt_tokens(plan.body) if plan.body is not None else chat_prompt_tokens(plan.chat)
        return plan

    def estimate(self, body: ResponseCreate, plan: Plan) -> int:
        """Tokens booked on the payer's tpm: the prompt and the output asked for, bounded by the model's limit."""
        return plan.prompt + completion_budget(body.max_output_tokens, self.calls.models[body.model].output_limit)

    async def _begin(
        self, body: ResponseCreate, payer: KeyEntry | None, wait_s: float, request_id: str | None, background: bool
    ) -> tuple[Plan, int, Callable[[str], BodyCall | ModelCall]]:
        """Before the call: the plan, the payer admitted (the tokens booked), and each model's call."""
        try:
            plan = self.plan(body)
            booked = await self.calls._admit(payer, self.estimate(body, plan), wait_s)
        except PromptfleetError as exc:
            raise _renamed(exc) from None
        call_id = request_id or request_ids.current() or request_ids.new_request_id()
        share = self.calls._share(payer, background)
        return plan, booked, lambda model: plan.call(model, call_id, share)

    async def create(
        self, body: ResponseCreate, payer: KeyEntry | None = None, *, wait_s: float = 0.0,
        request_id: str | None = None, background: bool = False,
    ) -> dict[str, Any]:
        """The ``response`` object (``model`` names the model that answered); raises PromptfleetError."""
        calls = self.calls
        plan, booked, build = await self._begin(body, payer, wait_s, request_id, background)

        async def attempt(model: str, call: BodyCall | ModelCall) -> tuple[bool, Any]:
            if isinstance(call, BodyCall):
                result = await calls.transport.send(model, "respond", call)
            else:
                result = await calls.transport.chat(model, call)
            return isinstance(result, ChatReply), result

        try:
            reply, model = await calls._along(plan.chain, build, attempt)
        except BaseException as exc:
            calls._refund(payer, booked)
            if isinstance(exc, PromptfleetError):
                raise _renamed(exc) from None
            raise
        if model in plan.forwarding:
            answer = dict(reply.completion)
            usage = reply.usage or estimated(plan.prompt, _output_tokens(answer))
        else:
            assert plan.chat is not None
            answer = responses.from_chat(body, reply.completion)
            usage = reply.usage or estimated(chat_prompt_tokens(plan.chat), reply_tokens(reply.completion))
        calls._record(payer, model, usage, booked)
        return answer

    async def stream(
        self, body: ResponseCreate, payer: KeyEntry | None = None, *, wait_s: float = 0.0,
        request_id: str | None = None, background: bool = False,
    ) -> Events:
        """Open the stream (errors before its first event raise, so they get their status code, or a
        fallback); return its events, ending with an error value if one happens later. The usage is
        recorded when the returned iterator ends, however it ends."""
        calls = self.calls
        started = time.monotonic()
        plan, booked, build = await self._begin(body, payer, wait_s, request_id, background)

        def open_stream(model: str, call: BodyCall | ModelCall) -> WorkerStream:
            if isinstance(call, BodyCall):
                return calls.transport.open(model, "respond_stream", call)
            return calls.transport.stream(model, call)

        try:
            chunks, first, model = await calls._open(plan.chain, build, open_stream)
        except BaseException as exc:
            calls._refund(payer, booked)
            if isinstance(exc, PromptfleetError):
                raise _renamed(exc) from None
            raise
        calls.metrics.first_token(model, time.monotonic() - started)
        if model in plan.forwarding:
            return calls._relay(chunks, first, model, lambda: plan.prompt, payer, booked)
        chat = plan.chat
        assert chat is not None
        return _translated(body, calls._relay(chunks, first, model, lambda: chat_prompt_tokens(chat), payer, booked))


def _or_none(make: Any, raise_it: bool) -> Any:
    """``make()``, or None if the request cannot be made that way (raised when ``raise_it``)."""
    try:
        return make()
    except InvalidRequest:
        if raise_it:
            raise
        return None


def _renamed(exc: PromptfleetError) -> PromptfleetError:
    """``exc`` naming the Responses field for the chat field it names."""
    exc.param = responses.param_of(exc.param)
    return exc


def _output_tokens(response: dict[str, Any]) -> int:
    """Output tokens of a ``response`` object without usage, counted from its items' text."""
    total = 0
    for item in response.get("output") or ():
        if isinstance(item, dict):
            parts = item.get("content")
            text = "".join(str(p.get("text") or "") for p in parts if isinstance(p, dict)) if isinstance(
                parts, list) else ""
            total += max(1, text_tokens(text + str(item.get("arguments") or "")))
    return total


async def _translated(body: ResponseCreate, chunks: Events) -> Events:
    """The Responses events of a streamed chat completion, those of chunks that came together in one
    list; an error value ends them."""
    sequence = responses.ResponseEvents(body)
    try:
        yield sequence.start()
        async for batch in chunks:
            if isinstance(batch, PromptfleetError):
                yield _renamed(batch)
                return
            events = [event for chunk in batch for event in sequence.chunk(chunk)]
            if events:
                yield events
        events = sequence.end()
        if events:
            yield events
    finally:
        await chunks.aclose()  # stops the worker's generation and bills what was produced
