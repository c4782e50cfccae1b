"""Fakes for the model call path without Ray: model workers behind the ``Transport`` seam, and
Serve-handle-shaped wrappers around plain objects (the RateLimiter and TaskStore classes).

``FakeWorkers`` answers like ``ModelWorker`` deployments reached through ``HandleTransport``:
for each model a script of what its next calls do —

- ``"ok"`` (the default once a script is used up): a ``ChatReply`` / a stream of ``chunks`` text
  pieces ending with a ``StreamEnd`` carrying ``usage``; the pieces come as a worker relaying an
  upstream sends them: the first in a list of its own, the rest in one list (they arrived together);
- a ``PromptfleetError`` instance: returned (or yielded, streaming) as a value, like a worker does;
- any other exception instance (Ray's ``BackPressureError``, ``ActorDiedError``, …): raised, like
  a handle does when the call could not be delivered or its replica died;
- ``"hang"``: never answers (until cancelled).

A scripted stream (a list of steps) is sent item by item, a chunk dict in a list of one (as a local
model's chunks); a list in it is sent as it is (chunks that came together).

The other routes' methods (``embed``, ``complete``, ``complete_stream``, ``respond``,
``respond_stream``) answer in their route's shape; ``respond_stream``'s events are those of
``response_events``.

Every call is kept in ``calls`` (model, ModelCall or BodyCall); streams record whether they were cancelled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from deployments.errors import PromptfleetError
from deployments.schemas import ChatReply, ModelCall, StreamEnd, Usage

USAGE = Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10)


class FakeStream:
    def __init__(self, items: list[Any]) -> None:
        self.items = [[item] if isinstance(item, dict) else item for item in items]
        self.cancelled = False
        self.taken = 0

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if self.cancelled or not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        self.taken += 1
        if item == "hang":
            await asyncio.Event().wait()
        if isinstance(item, BaseException) and not isinstance(item, PromptfleetError):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


def together(chunks: list[dict[str, Any]]) -> list[Any]:
    """A stream's chunks as a relaying worker sends them: the first alone, the rest in one list."""
    return [chunks[:1], chunks[1:]] if len(chunks) > 1 else [chunks] if chunks else []


def relayed(items: list[Any]) -> list[Any]:
    """A relayed stream's items one by one: the chunks of each list in order, an error value as it is."""
    return [chunk for item in items for chunk in (item if isinstance(item, list) else [item])]


class FakeWorkers:
    def __init__(
        self,
        script: dict[str, list[Any]] | None = None,
        usage: Usage | None = USAGE,
        chunks: tuple[str, ...] = ("Hel", "lo", "!"),
    ) -> None:
        self.script = script or {}
        self.usage = usage
        self.chunks = chunks
        self.calls: list[tuple[str, ModelCall]] = []
        self.streams: list[FakeStream] = []

    def _next(self, model: str) -> Any:
        queued = self.script.get(model)
        return queued.pop(0) if queued else "ok"

    def chat(self, model: str, call: ModelCall) -> Awaitable[Any]:
        self.calls.append((model, call))
        step = self._next(model)

        async def answer() -> Any:
            await asyncio.sleep(0)
            if step == "hang":
                await asyncio.Event().wait()
            if isinstance(step, BaseException) and not isinstance(step, PromptfleetError):
                raise step
            if step != "ok":
                return step  # an error value, or anything else a broken worker might answer
            completion = {
                "id": "chatcmpl-fake", "object": "chat.completion", "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.chunks)},
                             "finish_reason": "stop"}],
            }
            if self.usage is not None:
                completion["usage"] = self.usage.model_dump()
            return ChatReply(completion=completion, usage=self.usage)

        return answer()

    def stream(self, model: str, call: ModelCall) -> FakeStream:
        self.calls.append((model, call))
        step = self._next(model)
        if step == "ok":
            items: list[Any] = together([
                {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                 "choices": [{"index": 0, "delta": {"content": text}}]}
                for text in self.chunks
            ])
            items.append(StreamEnd(usage=self.usage))
        elif isinstance(step, list):
            items = list(step)  # a scripted stream, item by item
        else:
            items = [step]
        stream = FakeStream(items)
        self.streams.append(stream)
        return stream

    # The other routes (``embed``, ``complete``, ``complete_stream``, ``respond``, ``respond_stream``),
    # answered the same way.

    def send(self, model: str, method: str, call: Any) -> Awaitable[Any]:
        self.calls.append((model, call))
        step = self._next(model)

        async def answer() -> Any:
            await asyncio.sleep(0)
            if isinstance(step, BaseException) and not isinstance(step, PromptfleetError):
                raise step
            if step != "ok":
                return step
            if method == "respond":
                return ChatReply.of(response_object(model, "".join(self.chunks), self.usage))
            if method == "embed":
                # As the workers answer: usage with prompt tokens only (no ``Usage`` on the reply).
                data = [{"object": "embedding", "index": 0, "embedding": [0.6, 0.8]}]
                return ChatReply(completion={"object": "list", "data": data, "model": model,
                                             "usage": {"prompt_tokens": 5, "total_tokens": 5}})
            completion = {"id": "cmpl-fake", "object": "text_completion", "model": model,
                          "choices": [{"index": 0, "text": "".join(self.chunks), "finish_reason": "stop"}]}
            return ChatReply.of({**completion, "usage": self.usage.model_dump()} if self.usage else completion)

        return answer()

    def open(self, model: str, method: str, call: Any) -> FakeStream:
        self.calls.append((model, call))
        step = self._next(model)
        if step == "ok" and method == "respond_stream":
            items: list[Any] = [*together(response_events(model, self.chunks, self.usage)),
                                StreamEnd(usage=self.usage)]
        elif step == "ok":
            items = together([{"id": "cmpl-fake", "object": "text_completion", "model": model,
                               "choices": [{"index": 0, "text": text}]} for text in self.chunks])
            items.append(StreamEnd(usage=self.usage))
        else:
            items = list(step) if isinstance(step, list) else [step]
        stream = FakeStream(items)
        self.streams.append(stream)
        return stream

    def models_called(self) -> list[str]:
        return [model for model, _ in self.calls]


def response_object(model: str, text: str, usage: Usage | None) -> dict[str, Any]:
    """A ``response`` as an upstream speaking the Responses API makes it (id ``resp_upstream``)."""
    return {"id": "resp_upstream", "object": "response", "status": "completed", "model": model,
            "output": [{"type": "message", "id": "msg_upstream", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": None if usage is None else {"input_tokens": usage.prompt_tokens,
                                                 "output_tokens": usage.completion_tokens,
                                                 "total_tokens": usage.total_tokens}}


def response_events(model: str, chunks: tuple[str, ...], usage: Usage | None) -> list[dict[str, Any]]:
    """The events of an upstream's streamed response: created, a delta per chunk, completed."""
    done = response_object(model, "".join(chunks), usage)
    events = [{"type": "response.created", "response": {**done, "status": "in_progress", "output": []}}]
    events += [{"type": "response.output_text.delta", "item_id": "msg_upstream", "output_index": 0,
                "content_index": 0, "delta": text} for text in chunks]
    events.append({"type": "response.completed", "response": done})
    return [{**event, "sequence_number": number} for number, event in enumerate(events)]


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class Handle:
    """A plain object behind the ``handle.method.remote(...)`` shape of a DeploymentHandle (same
    event loop, no Ray): for the RateLimiter and TaskStore classes in unit tests."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._target, name))
