"""The relay's connections to an upstream: a real HTTP server on loopback (asyncio streams), no mocks."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai import AsyncOpenAI

from deployments.providers.relay import Relay

ANSWER = json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": []}).encode()


class ClosesReusedConnections:
    """Answers the first request of each connection (keep-alive), then closes the connection when a
    second request arrives on it, without an answer: what a server whose keep-alive timer fired as
    the client reused the connection looks like from the client's side."""

    def __init__(self) -> None:
        self.connections = 0
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                if served:
                    return  # closed with the request unanswered
                served += 1
                self.answered += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


def test_a_reused_connection_the_server_closed_is_sent_again_on_a_new_one() -> None:
    async def scenario() -> tuple[list[object], ClosesReusedConnections]:
        upstream = ClosesReusedConnections()
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        base_url = f"http://127.0.0.1:{port}/v1"
        relay = Relay(AsyncOpenAI(base_url=base_url, api_key="k"), base_url, "k", 4, 5.0)
        try:
            answers = [await relay.post("/chat/completions", {"model": "m"}, 5.0, None) for _ in range(3)]
        finally:
            await relay.close()
            server.close()
            await server.wait_closed()
        return answers, upstream

    answers, upstream = asyncio.run(scenario())
    assert answers == [json.loads(ANSWER)] * 3
    assert upstream.answered == 3
    assert upstream.connections >= 3  # each reuse failed and went out again on a new connection


def test_an_upstream_that_refuses_connections_is_not_tried_twice() -> None:
    import openai

    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()  # nothing listens there now
        base_url = f"http://127.0.0.1:{port}/v1"
        relay = Relay(AsyncOpenAI(base_url=base_url, api_key="k"), base_url, "k", 4, 5.0)
        try:
            await relay.post("/chat/completions", {"model": "m"}, 5.0, None)
        finally:
            await relay.close()

    with pytest.raises(openai.APIConnectionError):
        asyncio.run(scenario())


SSE_BODY = ('data: {"id":"c","choices":[{"delta":{"content":"h\u00e9"}}]}\r\n\r\n'
            ': a comment\n\n'
            'data: {"id":"c",\ndata: "choices":[]}\n\n'
            'data: [DONE]\n\n').encode()


def test_a_stream_is_parsed_from_its_bytes_however_they_are_cut() -> None:
    """Events split anywhere (inside a UTF-8 character too), CRLF lines, comments, multi-line data."""

    served = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        cut = SSE_BODY.index("\u00e9".encode()) + 1  # between the two bytes of the é
        for piece in (SSE_BODY[:cut], SSE_BODY[cut:cut + 7], SSE_BODY[cut + 7:]):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()  # until the client closes its end (the session is closed at the end)
        writer.close()
        await writer.wait_closed()
        served.set()

    async def go() -> list[object]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = Relay(AsyncOpenAI(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1"),
                      f"http://127.0.0.1:{port}/v1", None, 4, 5.0)
        try:
            stream = await relay.stream("/chat/completions", {"stream": True}, 5.0, None)
            events = [event async for event in stream]
            assert stream.done
            await stream.close()
            return events
        finally:
            await relay.close()
            await asyncio.wait_for(served.wait(), 5)
            server.close()
            await server.wait_closed()

    # The events in lists, each of those that one read completed (here, of the three pieces sent).
    assert [event for events in asyncio.run(go()) for event in events] == [
        {"id": "c", "choices": [{"delta": {"content": "h\u00e9"}}]}, {"id": "c", "choices": []}]
