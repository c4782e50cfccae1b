"""What crosses the ModelWorker handle.

``deployments.model_calls`` sends a ``ModelCall``; the worker answers a ``ChatReply`` (JSON) or a
stream of ``Chunks`` (lists of chunk dicts) ended by one ``StreamEnd``; expected errors come back as values (a
``PromptfleetError`` returned, or yielded last). See ``deployments.model_worker``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from deployments.schemas.chat import ChatCompletionRequest
from deployments.schemas.limiter import Share


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: Any) -> Usage | None:
        """A provider's usage dict as a ``Usage`` (chat's names, or the Responses API's ``input_tokens`` and
        ``output_tokens``); None if it has none (or not numbers)."""
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if prompt is None and completion is None:
            prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ModelCall(BaseModel):
    """One chat call for a ModelWorker: the validated request and the id it is logged under.

    It crosses the handle as its OpenAI body (a plain dict) and is validated again on arrival:
    pickling the nested pydantic models cost about four times as much (measured: 41 µs against
    11 µs per call, send and receive)."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest = Field(description="The validated chat request (`model` is the "
                                           "configured model the call is for, after fallbacks).")
    request_id: str = Field(description="Id of the request this call serves (logs, error bodies).")
    share: Share | None = Field(
        default=None, description="Who pays, for the fair share of a limited model's budget (None: unmetered)."
    )
    _body: dict[str, Any] | None = PrivateAttr(default=None)

    def body(self) -> dict[str, Any]:
        """The request as an OpenAI body: only what the client set (a copy: callers may edit it)."""
        if self._body is None:
            self._body = self.request.model_dump(exclude_unset=True, exclude_none=True)
        return dict(self._body)

    def __reduce__(self) -> tuple[Any, ...]:
        # The share as a tuple too: a pickled pydantic object doubled the payload (368 vs 194 bytes)
        # and cost ~7 µs more per call, send and receive.
        share = None if self.share is None else (self.share.tenant, self.share.weight, self.share.background)
        return (_model_call, (self.body(), self.request_id, share))


def _model_call(
    body: dict[str, Any], request_id: str, share: tuple[str, float | None, bool] | None = None
) -> ModelCall:
    # Built from what a validated ModelCall sent (__reduce__): the share needs no second check.
    shared = None if share is None else Share.model_construct(tenant=share[0], weight=share[1], background=share[2])
    call = ModelCall(request=ChatCompletionRequest.model_validate(body), request_id=request_id, share=shared)
    call._body = body
    return call


class ChatReply(BaseModel):
    """A worker's answer to a JSON chat call."""

    completion: dict[str, Any] = Field(description="The `chat.completion` body, `model` set to the model's name.")
    usage: Usage | None = Field(default=None, description="Tokens used, when the provider reported them.")

    @classmethod
    def of(cls, completion: dict[str, Any]) -> ChatReply:
        """The reply carrying a provider's completion dict, and its usage if it has one."""
        return cls(completion=completion, usage=Usage.of(completion.get("usage")))

    def __reduce__(self) -> tuple[Any, ...]:
        # As plain data, rebuilt on arrival: pickling the pydantic objects themselves cost about
        # five times as much per call.
        usage = None if self.usage is None else (self.usage.prompt_tokens, self.usage.completion_tokens)
        return (_chat_reply, (self.completion, usage))


def _chat_reply(completion: dict[str, Any], usage: tuple[int, int] | None) -> ChatReply:
    counted = None if usage is None else Usage(
        prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=usage[0] + usage[1])
    return ChatReply(completion=completion, usage=counted)


# A stream's chunk dicts that travel together, in order (never empty): those an upstream's answer
# delivered in one read, or one chunk of a local model. Each layer from the provider to the client's
# socket then pays its step once per list, not once per chunk (docs/performance.md, "Flat cost").
Chunks = list[dict[str, Any]]


class StreamEnd(BaseModel):
    """The last item of a worker's stream: what the generation used (None if the provider did not say)."""

    usage: Usage | None = None


class BodyCall(BaseModel):
    """One embeddings or text-completion call for a ModelWorker (``embed``, ``complete``,
    ``complete_stream``): the OpenAI body the Gateway validated (``EmbeddingRequest`` /
    ``CompletionRequest``, only the fields the client set; ``model`` is the configured model the call
    is for, after fallbacks), its request id and payer. The answer is a ``ChatReply`` (its
    ``completion`` is the route's response body) or, streaming, ``Chunks`` then a ``StreamEnd``."""

    model_config = ConfigDict(extra="forbid")

    body: dict[str, Any] = Field(description="The validated request body.")
    request_id: str = Field(description="Id of the request this call serves (logs, error bodies).")
    share: Share | None = Field(default=None, description="Who pays, for a limited model's fair share.")

    def __reduce__(self) -> tuple[Any, ...]:
        # Plain data across the handle (as ModelCall): the share as a tuple.
        share = None if self.share is None else (self.share.tenant, self.share.weight, self.share.background)
        return (_body_call, (self.body, self.request_id, share))


def _body_call(body: dict[str, Any], request_id: str, share: tuple[str, float | None, bool] | None) -> BodyCall:
    shared = None if share is None else Share.model_construct(tenant=share[0], weight=share[1], background=share[2])
    return BodyCall.model_construct(body=body, request_id=request_id, share=shared)
