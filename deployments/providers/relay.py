"""Relay: one POST to an OpenAI-compatible upstream over a bare aiohttp session, its answer as the
upstream's bytes parsed once — for ``providers.openai_compat.OpenAIProvider``'s calls.

Why: the OpenAI SDK builds, per call, request options, httpx ``Headers`` and ``URL`` objects and a
response wrapper, ~0.6 ms of CPU per call on top of the HTTP client's own ~0.2 ms (in-process,
256 concurrent; docs/performance.md) — most of the CPU a Gateway spends on an upstream call. A
relay needs none of it: the body goes out as JSON bytes, the answer comes back as a dict (JSON) or
lists of chunk dicts (SSE: the events of one read together), nothing else is built.

Failures are raised as the SDK would raise them (``openai.RateLimitError``,
``InternalServerError``, ``APIStatusError``, ``APIConnectionError``, ``APITimeoutError``, and
``APIError`` for an SSE event carrying an ``error``), built by the SDK's own client from the
status, headers and body, so ``openai_compat.translate_upstream_error`` — the one place upstream
failures become promptfleet errors — and the retry loop see exactly what they saw before. Those
objects are built only for failures.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import pydantic_core
from openai import AsyncOpenAI

# What a reused connection that the server had already closed fails with (before any answer).
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# How long an idle upstream connection is kept: below uvicorn's 5 s keep-alive (vLLM, SGLang and our
# fake upstream serve with it), so we drop it first. At httpx's 5 s both sides expired it together:
# calls that waited 5 s in a key's rpm queue reused connections the server was closing, several
# stale at once, and one failed twice (502) in the serve tier's CI.
IDLE_KEEPALIVE_S = 4.0


class Relay:
    """POSTs to ``base_url`` (``…/v1``) with at most ``max_connections`` open connections."""

    def __init__(
        self, client: AsyncOpenAI, base_url: str, api_key: str | None, max_connections: int, connect_timeout_s: float
    ) -> None:
        self.client = client  # the SDK client: only to build its exceptions from a failed answer
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key or 'unused'}", "Content-Type": "application/json",
                        "Accept": "application/json"}
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        # Made on first use: the session belongs to the running event loop.
        if self.session is None:
            # The TLS settings of the SDK's transport it replaces: httpx's context (certifi,
            # SSL_CERT_FILE). Idle connections are kept IDLE_KEEPALIVE_S, under the servers' own.
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0,
                                             ssl=httpx2.create_ssl_context(), keepalive_timeout=IDLE_KEEPALIVE_S)
            self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        return self.session

    async def _send(self, path: str, payload: dict[str, Any], remaining_s: float,
                    request_id: str | None) -> aiohttp.ClientResponse:
        url = self.base_url + path
        headers = {**self.headers, "X-Request-ID": request_id} if request_id else self.headers
        # As the SDK's httpx timeout did: connect within connect_timeout_s, and no read (of the answer or
        # of any later part of a stream) waits longer than the call's remaining deadline.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(self.connect_timeout_s, remaining_s),
                                        sock_read=max(remaining_s, 0.001))
        data = json.dumps(payload, separators=(",", ":"))
        try:
            try:
                response = await self._session().post(url, data=data, headers=headers, timeout=timeout)
            except STALE_CONNECTION as exc:
                if isinstance(exc, aiohttp.ClientConnectorError):
                    raise  # no connection was made: nothing stale about it
                # A pooled connection the server closed just as it was reused (its keep-alive ran out
                # as ours did not: uvicorn's is 5 s, like ours): the request never reached a handler.
                # Once more, on a new connection, as httpx and urllib3 do with a stale connection.
                response = await self._session().post(url, data=data, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise openai.APITimeoutError(request=_request(url)) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(request=_request(url)) from exc
        if response.status >= 400:
            try:
                body = await response.read()
            except aiohttp.ClientError:
                body = b""
            finally:
                response.release()
            raise self.client._make_status_error_from_response(httpx2.Response(
                response.status, headers=list(response.raw_headers), content=body, request=_request(url)))
        return response

    async def post(self, path: str, payload: dict[str, Any], remaining_s: float, request_id: str | None) -> Any:
        """The upstream's JSON answer, parsed (a dict for an OpenAI body)."""
        response = await self._send(path, payload, remaining_s, request_id)
        try:
            body = await response.read()
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(request=_request(self.base_url + path)) from exc
        finally:
            response.release()
        try:
            return json.loads(body)
        except ValueError:
            return None

    async def stream(self, path: str, payload: dict[str, Any], remaining_s: float,
                     request_id: str | None) -> RelayStream:
        """The upstream's SSE answer, opened (its status checked): iterate it for the chunk dicts."""
        return RelayStream(await self._send(path, payload, remaining_s, request_id), self.base_url + path)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class RelayStream:
    """The events of an SSE answer as parsed JSON, ending at ``[DONE]`` or the end of the body.

    Iterated, it yields lists of events: all the complete events of one read from the connection,
    in order (never empty). A read returns whatever has arrived, so an event is yielded as soon as
    it is read (nothing waits for a batch to fill), and the events that piled up while the event
    loop served other streams travel on as one batch: each layer above pays its hop, and the client
    its ``send`` and socket write, once per batch rather than once per event — a busier process
    spends less per event (docs/performance.md, "Flat cost").
    """

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self.response = response
        self.url = url
        self.done = False

    async def __aiter__(self) -> AsyncIterator[list[Any]]:
        # Bytes throughout: each event's data is parsed from the bytes it arrived in (a stream's
        # hundreds of chunks each paid a decode, a join and the stdlib's parser before).
        data: list[bytes] = []
        pending = b""
        try:
            # Lines split here, not by aiohttp's readline (which refuses lines over its buffer size).
            async for received in self.response.content.iter_any():
                *lines, pending = (pending + received).split(b"\n")
                batch: list[Any] = []
                failure: Exception | None = None
                for raw in lines:
                    line = raw.rstrip(b"\r")
                    if line:
                        if line.startswith(b"data:"):
                            data.append(line[5:].removeprefix(b" "))
                        continue  # comments, `event:`, `id:`, `retry:`: chat streams do not use them
                    if not data:
                        continue
                    text = data[0] if len(data) == 1 else b"\n".join(data)
                    data = []
                    if text.startswith(b"[DONE]"):
                        self.done = True
                        break
                    event = _event(text, self.url)
                    if isinstance(event, Exception):
                        failure = event
                        break
                    batch.append(event)
                # The events before a failed one (or [DONE]) go out first, as they did one by one.
                if batch:
                    yield batch
                if failure is not None:
                    raise failure
                if self.done:
                    return
            if pending.strip().startswith(b"data:"):
                data.append(pending.strip()[5:].removeprefix(b" "))
            if data:  # a last event without the blank line after it
                text = b"\n".join(data)
                if text.startswith(b"[DONE]"):
                    self.done = True
                    return
                event = _event(text, self.url)
                if isinstance(event, Exception):
                    raise event
                yield [event]
            self.done = True
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise openai.APITimeoutError(request=_request(self.url)) from exc
        except aiohttp.ClientError as exc:
            raise openai.APIConnectionError(request=_request(self.url)) from exc

    async def close(self) -> None:
        """Done with the answer: a finished one frees its connection for the next call; one left
        early is closed, which stops the upstream's generation."""
        if self.done:
            self.response.release()
        else:
            self.response.close()


def _event(text: bytes, url: str) -> Any:
    """The event's data parsed, or the exception its stream ends with (returned, so that the events
    read before it are yielded first): ``ValueError`` for invalid JSON or UTF-8, as before, or
    ``openai.APIError`` for an event carrying an ``error``."""
    # pydantic's parser (already a dependency): ~0.9 µs for a chat chunk against ~2.2 µs for
    # ``json.loads`` of the decoded text.
    try:
        data = pydantic_core.from_json(text)
    except ValueError as exc:
        return exc
    if isinstance(data, dict) and data.get("error"):
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else None
        return openai.APIError(message if isinstance(message, str) and message else
                               "An error occurred during streaming", _request(url), body=error)
    return data


def _request(url: str) -> httpx2.Request:
    return httpx2.Request("POST", url)
