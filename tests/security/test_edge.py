"""Issue 10, item 5: authentication before bodies, and every error in the OpenAI shape.

Regressions of what the issue reproduced: a chunked body over the limit answered 400
``{"detail": …}``; an unknown route ``{"detail": "Not Found"}``; a 150 MB upload to /v1/files
without a key was read in full before its 401. Each check runs on the Gateway's own listener
and through Serve's HTTP proxy (the auth app lives under the route prefix /auth there).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.fixtures import ServeApp
from tests.security.tenants import Tenant, assert_openai_error, new_tenant

pytestmark = pytest.mark.serve

HELLO = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def tenant(serve_app: ServeApp) -> Tenant:
    return new_tenant(serve_app)


def bases(app: ServeApp) -> list[str]:
    return [app.auth_base_url, f"{app.proxy_url}/auth/v1"]


def chunked(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


@pytest.mark.parametrize("via", ["listener", "proxy"])
def test_every_error_is_in_the_openai_shape(serve_app: ServeApp, tenant: Tenant, via: str) -> None:
    base = bases(serve_app)[via == "proxy"]
    auth = tenant.headers

    def request(method: str, path: str, **kwargs: object) -> httpx.Response:
        headers = {**auth, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.request(method, f"{base}{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]

    assert_openai_error(request("GET", "/no-such-route"), 404, "not_found")
    root = base.removesuffix("/v1")
    assert_openai_error(httpx.get(f"{root}/no-such-page", timeout=60), 404, "not_found")  # no key needed
    assert_openai_error(request("GET", "/chat/completions"), 405, "method_not_allowed")
    assert_openai_error(request("DELETE", "/models"), 405, "method_not_allowed")
    not_json = request("POST", "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_openai_error(not_json, 400, "invalid_request")
    missing = assert_openai_error(request("POST", "/chat/completions", json={"model": "fake"}), 400)
    assert missing["param"] == "messages"
    assert assert_openai_error(request("GET", "/runs", params={"limit": "many"}), 400)["param"] == "limit"
    broken_multipart = request(
        "POST", "/files", content=b"--x\r\nnot a part", headers={"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert_openai_error(broken_multipart, 400)
    declared = request("POST", "/chat/completions", content=b" " * 1_000_001,
                       headers={"Content-Type": "application/json"})
    assert_openai_error(declared, 413, "request_too_large")
    # Before the fix: 400 {"detail": "There was an error parsing the body"}.
    streamed = request("POST", "/chat/completions", content=chunked(3_000_000),
                       headers={"Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in streamed.request.headers}
    assert_openai_error(streamed, 413, "request_too_large")
    # The guards refuse only what they should: a normal request still flows.
    assert request("POST", "/chat/completions", json=HELLO).status_code == 200


@pytest.mark.parametrize("via", ["listener", "proxy"])
def test_no_key_is_401_before_any_body(serve_app: ServeApp, via: str) -> None:
    base = bases(serve_app)[via == "proxy"]
    for headers in ({}, {"Authorization": "Bearer pf-not-a-key"}):
        response = httpx.post(f"{base}/chat/completions", json=HELLO, headers=headers, timeout=60)
        assert_openai_error(response, 401, "invalid_api_key")
        refused = httpx.post(f"{base}/files", content=chunked(5_000_000), timeout=60,
                             headers={**headers, "Content-Type": "multipart/form-data; boundary=x"})
        assert_openai_error(refused, 401, "invalid_api_key")


def test_upload_without_key_is_refused_before_its_body(serve_app: ServeApp) -> None:
    """A 150 MB upload without a key: the 401 comes before a single body byte is sent, and the
    server closes the connection rather than read the rest (before the fix it read all 150 MB)."""
    url = urlsplit(serve_app.auth_base_url)
    assert url.hostname is not None and url.port is not None
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            f"POST {url.path}/files HTTP/1.1\r\nHost: {url.hostname}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {150 * 1024 * 1024}\r\n\r\n".encode()
        )
        answer = b""
        while part := sock.recv(65536):  # until the server closes (a timeout here fails the test)
            answer += part
    head = answer.decode(errors="replace")
    assert head.startswith("HTTP/1.1 401"), head[:300]
    assert '"invalid_api_key"' in head and "connection: close" in head.lower()
