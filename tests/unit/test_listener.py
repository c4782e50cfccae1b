"""The Gateway listener's guards against slow and half-sent requests (issue 23, part 3).

The listener (deployments.gateway.listener, with deployments.gateway.protocol) runs in a child process
(tests/fakes/listener_server.py) behind the Gateway's body-size layer, so its file descriptors are
its own to count; clients are real sockets, urllib and httpx.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deployments.gateway.protocol import ConnectionBook
from tests.cluster.harness import free_port

REPO = Path(__file__).resolve().parents[2]
ATTACKER = "127.0.0.7"  # another client address: the caps are per address
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
PER_IP = 200


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@contextlib.contextmanager
def listening(header_timeout_s: float) -> Iterator[Server]:
    host = "127.0.0.1"
    port = free_port(host)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.listener_server", host, str(port), str(header_timeout_s),
         str(BODY_TIMEOUT_S), "4096", str(PER_IP)], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield Server(proc, host, port)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with listening(HEADER_TIMEOUT_S) as running:
        yield running


def raw(server: Server, data: bytes, source: str = "127.0.0.1", timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection((server.host, server.port), timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def split(response: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


def fresh_requests(server: Server, count: int) -> list[float]:
    """Seconds per request of a client opening a new connection for each."""
    took = []
    for _ in range(count):
        started = time.perf_counter()
        reply = raw(server, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        took.append(time.perf_counter() - started)
        assert reply.endswith(b'{"ok":true}'), reply
    return took


def test_the_connection_book_holds_both_caps() -> None:
    book = ConnectionBook(max_total=3, max_per_ip=2)
    assert book.admit("a") and book.admit("a") and not book.admit("a")  # per address
    assert book.admit("b") and not book.admit("c")  # in total
    book.release("a")
    assert book.admit("c") and book.refused == 2 and book.total == 3


def test_5000_half_open_connections_neither_exhaust_descriptors_nor_slow_a_normal_client() -> None:
    with listening(header_timeout_s=15) as server:
        slowloris(server, 15)


def slowloris(server: Server, header_timeout_s: float) -> None:
    fresh_requests(server, 5)  # warm
    baseline = statistics.median(fresh_requests(server, 50))
    fds_before = server.fds()
    half_open: list[socket.socket] = []
    opened = time.monotonic()
    try:
        for _ in range(5000):
            sock = socket.socket()
            sock.bind((ATTACKER, 0))
            sock.settimeout(10)
            sock.connect((server.host, server.port))
            with contextlib.suppress(OSError):  # a connection over the cap may be closed already
                sock.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Len")
            half_open.append(sock)
        time.sleep(0.5)
        fds_during = server.fds()
        during = statistics.median(fresh_requests(server, 50))
        assert time.monotonic() - opened < header_timeout_s, "too slow to measure before the timeout"
        print(f"fresh-connection request, median: {baseline * 1000:.2f} ms alone, {during * 1000:.2f} ms with "
              f"5000 half-open connections; server descriptors {fds_before} -> {fds_during}")
        assert fds_during <= fds_before + PER_IP + 20, (fds_before, fds_during)
        assert during < max(10 * baseline, baseline + 0.05), (baseline, during)
        # The admitted ones get a 408 in the OpenAI shape within the header timeout; the rest were closed.
        time.sleep(max(0.0, opened + header_timeout_s + 1 - time.monotonic()))
        answered = refused = 0
        for sock in half_open:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                data = b""
            if data.startswith(b"HTTP/1.1 408"):
                _, _, body = split(data)
                assert body["error"]["code"] == "request_timeout"  # type: ignore[index]
                answered += 1
            else:
                assert data == b""
                refused += 1
        assert answered == PER_IP and refused == 5000 - PER_IP, (answered, refused)
        assert server.fds() <= fds_before + 5
    finally:
        for sock in half_open:
            sock.close()


def test_a_client_that_never_sends_is_closed_without_an_answer(server: Server) -> None:
    started = time.monotonic()
    assert raw(server, b"") == b""
    assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_a_kept_alive_connection_serves_requests_and_times_out_a_slow_next_header(server: Server) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(3):  # a client that keeps its connection and asks again (within the header timeout)
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"ok":true}'):
                reply += sock.recv(65536)
            time.sleep(HEADER_TIMEOUT_S * 0.6)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHo")
        status, _, body = split(sock.recv(65536))
    assert status == 408 and body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_a_body_paused_past_the_body_timeout_is_cut_and_a_slow_steady_one_passes(server: Server) -> None:
    head = b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        for _ in range(4):  # 40 bytes over ~3 s: each pause under the body timeout
            sock.sendall(b"x" * 10)
            time.sleep(BODY_TIMEOUT_S * 0.4)
        assert b'{"bytes":40}' in sock.recv(65536)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 10)
        started = time.monotonic()
        assert sock.recv(65536) == b""
        assert time.monotonic() - started < BODY_TIMEOUT_S + 2


def test_an_oversized_body_without_expect_continue_reads_the_413(server: Server) -> None:
    """urllib writes the whole body before it reads; without a lingering close it saw a reset."""
    body = b"x" * 7_000_000
    request = urllib.request.Request(f"{server.url}/v1/echo", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 413
    error = json.loads(caught.value.read())["error"]
    assert error["code"] == "request_too_large" and "1000000 bytes" in error["message"]
    # Under the limit, the same client is served.
    with urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/echo", data=b"x" * 1000, method="POST"),
                                timeout=10) as reply:
        assert json.loads(reply.read()) == {"bytes": 1000}


def test_a_chunked_body_over_the_limit_reads_the_413(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 100_000

    reply = httpx.post(f"{server.url}/v1/echo", content=chunks(), timeout=10)
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("request_bytes", "param"),
    [
        (b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
        (b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "Content-Length"),
        (b"GET /ping HTTP/1.1\r\nBad Header Line\r\n\r\n", None),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", None),  # a TLS hello to the plain-HTTP port
    ],
    ids=["content-length-not-a-number", "two-content-lengths", "header-without-colon", "tls-hello"],
)
def test_requests_the_parser_refuses_get_a_400_in_the_openai_shape(
    server: Server, request_bytes: bytes, param: str | None
) -> None:
    status, headers, body = split(raw(server, request_bytes))
    assert status == 400 and headers["content-type"] == "application/json"
    error = body["error"]
    assert isinstance(error, dict)
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert error["param"] == param and error["message"].startswith("The request is not valid HTTP/1.1")
    assert error["request_id"] == headers["x-request-id"]
    assert "Traceback" not in error["message"]
