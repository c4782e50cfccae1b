"""Provider for any OpenAI-compatible upstream, through the official AsyncOpenAI client.

This module is the one place where upstream failures become promptfleet errors,
and it owns the one retry layer of this call path: the client is built with
``max_retries=0`` and ``_call_with_retries`` retries 429/5xx/connection errors
with jittered exponential backoff (Retry-After wins), all inside the model's
total deadline ``timeout_s``. An upstream that accepts and never answers
therefore yields ``UpstreamTimeout`` (504) after ``timeout_s``, not a hang.

Bodies pass through untouched except ``model`` (rewritten to the upstream's
name) and, on streams, ``stream_options.include_usage`` (always asked for, so a
stream is billed by the upstream's own count; the usage chunk reaches the client
only if it asked): fields promptfleet does not know reach the upstream as the
client sent them. A /v1/responses body of a model whose upstream speaks that API
(``upstream_api: responses``) goes to its ``/responses`` the same way (``respond``,
``respond_stream``), billed by the usage of the upstream's response.
``client.post(..., cast_to=object)`` skips building typed
response objects we would only turn back into dicts; in a replica the call goes out through
``relay.Relay`` instead (a bare aiohttp POST: the SDK's request building cost more CPU than the rest
of the call), which raises the SDK's exceptions, so everything below is the same for both. A ``Retry-After`` is parsed
strictly and capped at the model's ``max_retry_after_s``. The id of the request a call serves goes
upstream as ``X-Request-ID``.

The token estimate booked on the model's ``tpm`` before each try is settled with the real
usage, given back when the upstream refused or was never reached (429, 5xx, 4xx, connection
errors), and kept for a try that timed out or was cancelled in flight (the upstream may have
generated it anyway). A stream without usage is settled with the tokens counted as relayed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream, DefaultAioHttpClient
from openai._types import RequestOptions  # the type of `options=`; not re-exported at the top

from deployments import request_ids
from deployments.config import OpenAIModel
from deployments.core.retry import BackoffPolicy, parse_retry_after
from deployments.core.tokens import StreamCounter, chat_prompt_tokens, completion_budget, response_prompt_tokens
from deployments.errors import (
    InvalidRequest,
    PromptfleetError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from deployments.limits.guard import UpstreamGuard
from deployments.providers.relay import Relay, RelayStream
from deployments.schemas import Chunks, Share, StreamEnd, Usage
from deployments.schemas.completions import DEFAULT_MAX_TOKENS
from deployments.schemas.inputs import item_tokens, items
from deployments.telemetry import NULL, Metrics

# openai >= 3 runs on httpx2 (the successor of httpx, same API): clients, timeouts and the
# transport errors we translate all come from it.

T = TypeVar("T")

_RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)


def outcome(error: PromptfleetError) -> str:
    """The ``outcome`` label of an upstream try that failed with ``error``."""
    if isinstance(error, UpstreamRateLimited):
        return "rate_limited"
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, InvalidRequest):
        return "rejected"
    return "error"


def input_tokens(value: Any) -> int:
    """Estimated tokens of an embedding request's ``input`` (exact for token arrays)."""
    return sum(item_tokens(item) for item in items(value)) if value else 0


def translate_upstream_error(exc: Exception, model: str, max_retry_after_s: float = 60.0) -> PromptfleetError:
    """Map an openai/httpx exception to the error the client should see.

    The upstream's own message is passed on only for 4xx answers about the
    client's request (they help the caller fix it); for everything else the
    client gets our own wording, never the exception text.
    """
    if isinstance(exc, PromptfleetError):
        return exc
    if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException, TimeoutError)):
        return UpstreamTimeout(f"The upstream for model '{model}' did not answer in time.")
    if isinstance(exc, openai.RateLimitError):
        retry_after = parse_retry_after(exc.response.headers.get("retry-after"), max_retry_after_s)
        return UpstreamRateLimited(
            f"The upstream for model '{model}' is rate limiting; retry later.",
            retry_after=retry_after if retry_after is not None else 1.0,
        )
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in (400, 413, 422):
            body = exc.body if isinstance(exc.body, dict) else {}
            param = body.get("param") if isinstance(body.get("param"), str) else None
            message = body.get("message") if isinstance(body.get("message"), str) else None
            return InvalidRequest(
                f"The upstream for model '{model}' rejected the request: {message or 'invalid request'}",
                param=param,
            )
        if status == 408:
            return UpstreamTimeout(f"The upstream for model '{model}' timed out.")
        return UpstreamError(f"The upstream for model '{model}' failed (HTTP {status}).")
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)):
        return UpstreamError(f"Could not reach the upstream for model '{model}'.")
    if isinstance(exc, openai.APIError):
        # Raised by the SSE decoder when an event carries an `error` object.
        return UpstreamError(f"The upstream for model '{model}' reported an error mid-stream.")
    return UpstreamError(f"The upstream for model '{model}' failed.")


class OpenAIProvider:
    """Calls one upstream model. Safe for many concurrent calls from one event loop."""

    def __init__(
        self,
        config: OpenAIModel,
        api_key: str | None,
        *,
        http_client: httpx2.AsyncClient | None = None,
        backoff: BackoffPolicy | None = None,
        guard: UpstreamGuard | None = None,
        metrics: Metrics = NULL,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.guard = guard or UpstreamGuard(
            config.name, budget=None, limiter=None, max_pause_s=config.max_retry_after_s
        )
        self.upstream_model = config.upstream_model or config.name
        self.backoff = backoff or BackoffPolicy()
        limits = httpx2.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
        )
        self.client = AsyncOpenAI(
            base_url=config.base_url,
            # The SDK insists on a key; "unused" is what local servers (vLLM, Ollama) accept.
            api_key=api_key or "unused",
            max_retries=0,  # the retry layer is _call_with_retries
            timeout=httpx2.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            # The SDK's aiohttp transport: aiohttp's C HTTP parser instead of pure-Python httpcore
            # (py-spy: httpcore was a third of a worker's CPU under load).
            http_client=http_client or DefaultAioHttpClient(limits=limits),
        )
        # Calls go out through the bare relay; the SDK's own path stays for an injected client (tests).
        self.relay = None if http_client is not None else Relay(
            self.client, config.base_url, api_key, config.max_concurrency, config.connect_timeout_s)

    async def chat(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        return await self._json("/chat/completions", body, self.estimate(body), share)

    async def embed(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """Forwarded to the upstream's /embeddings (``dimensions``, ``encoding_format`` as sent)."""
        return await self._json("/embeddings", body, input_tokens(body.get("input")), share)

    async def complete(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """Forwarded to the upstream's /completions."""
        return await self._json("/completions", body, self.completion_estimate(body), share)

    async def _json(self, path: str, body: dict[str, Any], tokens: int, share: Share | None) -> dict[str, Any]:
        payload = {**body, "model": self.upstream_model}
        if path != "/embeddings":
            payload["stream"] = False

        async def attempt(remaining_s: float) -> dict[str, Any]:
            if self.relay is not None:
                result = await self.relay.post(path, payload, remaining_s, request_ids.current())
            else:
                result = await self.client.post(path, cast_to=object, body=payload, options=self._options(remaining_s))
            if not isinstance(result, dict):
                raise UpstreamError(f"The upstream for model '{self.config.name}' sent a non-JSON answer.")
            return result

        result = await self._call_with_retries(attempt, tokens, share)
        usage = result.get("usage")
        used = usage.get("total_tokens") if isinstance(usage, dict) else None
        self.guard.settle(tokens, used if isinstance(used, int) else tokens)
        result["model"] = self.config.name
        return result

    def estimate(self, body: dict[str, Any]) -> int:
        """Tokens to book on the model's tpm budget: the prompt, and the output asked for (bounded)."""
        requested = body.get("max_completion_tokens") or body.get("max_tokens")
        return chat_prompt_tokens(body) + completion_budget(requested, self.config.output_limit)

    def completion_estimate(self, body: dict[str, Any]) -> int:
        """Tokens to book for a /completions call: the prompts, and the output asked for each (bounded)."""
        prompts = items(body["prompt"]) if "prompt" in body else []
        per_prompt = completion_budget(body.get("max_tokens") or DEFAULT_MAX_TOKENS, self.config.output_limit)
        return sum(item_tokens(p) for p in prompts) + per_prompt * max(len(prompts), 1) * (body.get("n") or 1)

    def stream(self, body: dict[str, Any], share: Share | None = None) -> AsyncIterator[Chunks | StreamEnd]:
        """The stream's chunks in lists (those that arrived together: ``relay.RelayStream``), then a
        ``StreamEnd``."""
        return self._sse("/chat/completions", body, self.estimate(body),
                         chat_prompt_tokens(body), share)

    def complete_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[Chunks | StreamEnd]:
        """Forwarded to the upstream's /completions as a stream."""
        prompt = sum(item_tokens(p) for p in items(body["prompt"]))
        return self._sse("/completions", body, self.completion_estimate(body), prompt, share)

    async def _sse(
        self, path: str, body: dict[str, Any], tokens: int, prompt_estimate: int, share: Share | None
    ) -> AsyncIterator[Chunks | StreamEnd]:
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        payload = {
            **body,
            "model": self.upstream_model,
            "stream": True,
            "stream_options": {**(body.get("stream_options") or {}), "include_usage": True},
        }

        # Retries cover opening the stream only: once a chunk went out, a retry would duplicate text.
        upstream = await self._call_with_retries(
            lambda remaining_s: self._open_stream(path, payload, remaining_s), tokens, share)
        usage: Usage | None = None
        counter = StreamCounter()
        try:
            async for events in upstream:
                chunks: Chunks = []
                for chunk in events:
                    if isinstance(chunk, dict):
                        if chunk.get("usage"):
                            usage = Usage.of(chunk["usage"]) or usage
                            if not chunk.get("choices") and not client_wants_usage:
                                continue  # the usage chunk we asked for on our own account
                        counter.add(chunk)
                        chunk["model"] = self.config.name
                        chunks.append(chunk)
                if chunks:
                    yield chunks
            yield StreamEnd(usage=usage)
        except Exception as exc:
            raise translate_upstream_error(exc, self.config.name, self.config.max_retry_after_s) from None
        finally:
            # Closing the response stops the upstream generation when our client went away.
            await upstream.close()
            used = usage.total_tokens if usage is not None else prompt_estimate + counter.completion_tokens
            self.guard.settle(tokens, used)

    # -- /v1/responses forwarded to an upstream that speaks it (``upstream_api: responses``) ---------

    def response_estimate(self, body: dict[str, Any]) -> int:
        """Tokens to book for a /responses call: its input, tools and format, and the output asked for."""
        return response_prompt_tokens(body) + completion_budget(body.get("max_output_tokens"),
                                                                self.config.output_limit)

    async def respond(self, body: dict[str, Any], share: Share | None = None) -> dict[str, Any]:
        """Forwarded to the upstream's /responses: its ``response`` object (``model`` renamed)."""
        return await self._json("/responses", body, self.response_estimate(body), share)

    async def respond_stream(
        self, body: dict[str, Any], share: Share | None = None
    ) -> AsyncIterator[Chunks | StreamEnd]:
        """Forwarded to the upstream's /responses as a stream: its events as they come, in lists as
        they arrived together (the ``model`` of the response they carry renamed), then a ``StreamEnd``
        with the usage of its last ``response.completed`` / ``response.incomplete``. An ``error`` or
        ``response.failed`` event ends the stream with ``UpstreamError`` (our words, not the
        upstream's)."""
        tokens = self.response_estimate(body)
        payload = {**body, "model": self.upstream_model, "stream": True}

        # As for chat: retries cover opening the stream only.
        upstream = await self._call_with_retries(
            lambda remaining_s: self._open_stream("/responses", payload, remaining_s), tokens, share)
        usage: Usage | None = None
        counter = StreamCounter()
        try:
            async for received in upstream:
                events: Chunks = []
                failed = False
                for event in received:
                    if not isinstance(event, dict):
                        continue
                    response = event.get("response")
                    if isinstance(response, dict):
                        response["model"] = self.config.name
                        usage = Usage.of(response.get("usage")) or usage
                    if event.get("type") in ("error", "response.failed"):
                        failed = True
                        break
                    counter.add(event)
                    events.append(event)
                if events:  # those before the error event still go out, as they did one by one
                    yield events
                if failed:
                    raise UpstreamError(f"The upstream for model '{self.config.name}' reported an error mid-stream.")
            yield StreamEnd(usage=usage)
        except Exception as exc:
            raise translate_upstream_error(exc, self.config.name, self.config.max_retry_after_s) from None
        finally:
            await upstream.close()
            used = usage.total_tokens if usage is not None else response_prompt_tokens(body) + counter.completion_tokens
            self.guard.settle(tokens, used)

    async def close(self) -> None:
        await self.guard.close()
        if self.relay is not None:
            await self.relay.close()
        await self.client.close()

    async def _open_stream(
        self, path: str, payload: dict[str, Any], remaining_s: float
    ) -> SDKStream | RelayStream:
        """One try at opening an SSE answer: through the relay, or the SDK for an injected client."""
        if self.relay is not None:
            return await self.relay.stream(path, payload, remaining_s, request_ids.current())
        return SDKStream(await self.client.post(path, cast_to=object, body=payload,
                                                options=self._options(remaining_s), stream=True,
                                                stream_cls=AsyncStream[object]))

    def _options(self, remaining: float) -> RequestOptions:
        """Per-try request options: the try's timeout and, when the call serves a request, its id as
        ``X-Request-ID`` (the upstream's logs can then be matched with ours)."""
        options: RequestOptions = {"timeout": self._timeout(remaining)}
        request_id = request_ids.current()
        if request_id:
            options["headers"] = {"X-Request-ID": request_id}
        return options

    def _timeout(self, remaining: float) -> httpx2.Timeout:
        return httpx2.Timeout(max(remaining, 0.001), connect=min(self.config.connect_timeout_s, remaining))

    async def _call_with_retries(
        self, call: Callable[[float], Awaitable[T]], tokens: int, share: Share | None = None
    ) -> T:
        deadline = time.monotonic() + self.config.timeout_s
        attempt = 0
        name = self.config.name
        while True:
            attempt += 1
            await self.guard.admit(tokens, deadline, share)
            started = time.monotonic()
            remaining = deadline - started
            try:
                # asyncio.timeout backs up httpx's per-phase timeouts with a hard total deadline.
                async with asyncio.timeout(max(remaining, 0.001)):
                    result = await call(remaining)
            except _RETRYABLE as exc:
                error = translate_upstream_error(exc, name, self.config.max_retry_after_s)
                self.metrics.upstream_call(name, outcome(error), time.monotonic() - started)
                self.guard.settle(tokens, 0)  # refused or never reached: nothing was generated
                if isinstance(exc, openai.RateLimitError):
                    # Not a failure of the upstream: pause every replica, do not trip the breaker.
                    self.guard.rate_limited(error.retry_after or 1.0)
                else:
                    self.guard.failure()
                if attempt > self.config.max_retries or isinstance(exc, openai.APITimeoutError):
                    break
                delay = self.backoff.delay(attempt, error.retry_after)
                if time.monotonic() + delay >= deadline:
                    break
                self.metrics.upstream_retry(name)
                await asyncio.sleep(delay)
            except Exception as exc:
                error = translate_upstream_error(exc, name, self.config.max_retry_after_s)
                self.metrics.upstream_call(name, outcome(error), time.monotonic() - started)
                if not isinstance(error, UpstreamTimeout):
                    self.guard.settle(tokens, 0)  # a timed-out call may have generated; keep its booking
                if not isinstance(error, InvalidRequest):
                    self.guard.failure()
                break
            else:
                self.metrics.upstream_call(name, "ok", time.monotonic() - started)
                self.guard.success()
                return result
        try:
            raise error
        finally:
            # The error's traceback holds this frame: the local naming it would make a reference
            # cycle, which only the collector frees (84 objects a call the upstream refused with 429).
            del error


class SDKStream:
    """The SDK's stream (an injected client's) read as the relay's: its events in lists (of one)."""

    def __init__(self, stream: AsyncStream[object]) -> None:
        self.stream = stream

    async def __aiter__(self) -> AsyncIterator[list[Any]]:
        async for event in self.stream:
            yield [event]

    async def close(self) -> None:
        await self.stream.close()
