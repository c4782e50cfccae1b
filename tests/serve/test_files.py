"""Files at real sizes and with hostile names, through the official openai client and raw HTTP.

Against the session's cluster (tests/fixtures.py): the main app (auth off, uploads limited to
``MAX_UPLOAD_BYTES``) for sizes, ranges and a batch whose output is over 8 MB; the auth app for
names, downloaded by their owner and by the admin (API and console).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import httpx
import openai
import pytest

from deployments.core.files import content_disposition
from tests.fixtures import ADMIN_KEY, MAX_UPLOAD_BYTES, ServeApp
from tests.security.tenants import ADMIN, Tenant, call, new_tenant, openai_client
from tests.waiting import wait_for

pytestmark = pytest.mark.serve
MB = 1_000_000


def chat_line(custom_id: str, text: str, **body: Any) -> bytes:
    return json.dumps({
        "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "fake", "messages": [{"role": "user", "content": text}], "max_tokens": 16, **body},
    }, ensure_ascii=False).encode() + b"\n"


def jsonl_of_size(size: int, seed: int = 1) -> bytes:
    """Batch lines with varied, partly non-ASCII text, cut to exactly ``size`` bytes (last line ends in \\n)."""
    rng = random.Random(seed)
    out, n = bytearray(), 0
    while len(out) < size:
        words = " ".join(rng.choice(["alpha", "βήτα", "日本語", "x" * rng.randint(1, 40), '"q"']) for _ in range(80))
        out += chat_line(f"line-{n}", words)
        n += 1
    return bytes(out[: size - 1]) + b"\n"


def content_url(app: ServeApp, file_id: str) -> str:
    return f"{app.base_url}/files/{file_id}/content"


def test_a_12_mb_file_uploads_and_downloads_byte_identical_with_ranges(app: ServeApp) -> None:
    client = app.client()
    content = jsonl_of_size(12 * MB)
    uploaded = client.files.create(file=("twelve.jsonl", content), purpose="batch")
    assert uploaded.bytes == len(content) and uploaded.filename == "twelve.jsonl"
    try:
        downloaded = client.files.with_raw_response.content(uploaded.id)
        assert downloaded.status_code == 200
        assert downloaded.headers["content-length"] == str(len(content))
        assert downloaded.headers["accept-ranges"] == "bytes"
        assert downloaded.content == content
        # Through Serve's HTTP proxy too (its hop carries each piece in a message of its own).
        proxied = httpx.get(f"{app.proxy_url}/v1/files/{uploaded.id}/content", timeout=120)
        assert proxied.status_code == 200 and proxied.headers["content-length"] == str(len(content))
        assert proxied.content == content

        size = len(content)
        for header, first, last in (("bytes=5000000-5999999", 5_000_000, 5_999_999),  # crosses pieces
                                    ("bytes=-100", size - 100, size - 1),
                                    (f"bytes={size - 10}-", size - 10, size - 1),
                                    ("bytes=0-0", 0, 0)):
            part = httpx.get(content_url(app, uploaded.id), headers={"Range": header}, timeout=60)
            assert part.status_code == 206, (header, part.text[:200])
            assert part.headers["content-range"] == f"bytes {first}-{last}/{size}"
            assert part.headers["content-length"] == str(last - first + 1)
            assert part.content == content[first:last + 1]
        ignored = httpx.get(content_url(app, uploaded.id), headers={"Range": "bytes=0-1,5-6"}, timeout=60)
        assert ignored.status_code == 200 and ignored.content == content  # several ranges: the whole file
        refused = httpx.get(content_url(app, uploaded.id), headers={"Range": f"bytes={size}-"}, timeout=60)
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}"
        assert refused.json()["error"]["param"] == "Range"
    finally:
        client.files.delete(uploaded.id)


def pieces(body: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


def test_past_the_upload_limit_is_413_and_a_file_at_it_is_stored(app: ServeApp) -> None:
    client = app.client()
    before = {f.id for f in client.files.list()}
    over = jsonl_of_size(MAX_UPLOAD_BYTES + 1, seed=2)
    # Content-Length declared: refused before the body is read.
    with pytest.raises(openai.APIStatusError) as refused:
        client.files.create(file=("over.jsonl", over), purpose="batch")
    assert refused.value.status_code == 413
    assert refused.value.body["param"] == "file"  # type: ignore[index]
    assert str(MAX_UPLOAD_BYTES) in refused.value.body["message"]  # type: ignore[index]
    # Chunked (no Content-Length): counted as it arrives, refused when the file passes the limit.
    request = httpx.Request("POST", f"{app.base_url}/files", data={"purpose": "batch"},
                            files={"file": ("over.jsonl", over)})
    body = request.read()
    chunked = httpx.post(f"{app.base_url}/files", content=pieces(body), timeout=120,
                         headers={"content-type": request.headers["content-type"]})
    assert chunked.status_code == 413, chunked.text[:300]
    assert chunked.json()["error"]["param"] == "file"
    assert {f.id for f in client.files.list()} == before
    assert app.state_dir is not None and not list((app.state_dir / "batches" / "uploads").glob("*.part"))

    at_limit = over[: MAX_UPLOAD_BYTES - 1] + b"\n"
    stored = client.files.create(file=("at-limit.jsonl", at_limit), purpose="batch")
    try:
        assert stored.bytes == MAX_UPLOAD_BYTES
        assert client.files.content(stored.id).content == at_limit
    finally:
        client.files.delete(stored.id)


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float) -> Any:
    def ended() -> Any:
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "failed", "cancelled") else None

    return wait_for(ended, timeout, interval_s=2, message=lambda: f"batch {batch_id} still running")


@pytest.mark.timeout(900)
def test_a_batch_output_over_8_mb_downloads_whole_from_the_api_and_the_console(app: ServeApp) -> None:
    client = app.client()
    # The fake upstream answers a json_schema request with an instance of the schema: a 4,000
    # character string per line makes each output line about 4.5 kB.
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 4000}}, "required": ["text"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "long", "schema": schema}}
    lines = 2000
    content = b"".join(chat_line(f"big-{i}", f"q{i}", response_format=response_format) for i in range(lines))
    uploaded = client.files.create(file=("big-output.jsonl", content), purpose="batch")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    done = wait_batch(client, created.id, timeout=800)
    assert done.status == "completed" and done.output_file_id
    assert done.request_counts is not None and done.request_counts.completed == lines

    downloaded = client.files.with_raw_response.content(done.output_file_id)
    output = downloaded.content
    assert len(output) > 8 * MB
    assert downloaded.headers["content-length"] == str(len(output))
    assert client.files.retrieve(done.output_file_id).bytes == len(output)
    parsed = [json.loads(line) for line in output.splitlines()]
    assert sorted(line["custom_id"] for line in parsed) == sorted(f"big-{i}" for i in range(lines))
    for line in parsed:
        answer = json.loads(line["response"]["body"]["choices"][0]["message"]["content"])
        assert len(answer["text"]) >= 4000

    console = httpx.get(f"{app.url}/console/files/{done.output_file_id}/content", timeout=120)
    assert console.status_code == 200 and console.headers["content-length"] == str(len(output))
    assert console.content == output
    assert console.headers["content-disposition"] == content_disposition(f"{created.id}_output.jsonl")


def raw_upload(app: ServeApp, who: Tenant, filename: bytes, content: bytes) -> httpx.Response:
    """A multipart upload with the part's filename parameter exactly as given (quoted, `\\"` escaped)."""
    body = (b'--BOUNDARY\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--BOUNDARY\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--BOUNDARY--\r\n")
    return call(app, who, "POST", "/files", content=body,
                headers={"Content-Type": "multipart/form-data; boundary=BOUNDARY"})


def shown_name(response: httpx.Response) -> str:
    """The name a client shows: RFC 6266's filename* (after checking the header has no extra parameter)."""
    header = response.headers["content-disposition"]
    assert [p.split("=", 1)[0].strip() for p in header.split(";")] == ["attachment", "filename", "filename*"]
    return unquote(header.split("filename*=UTF-8''", 1)[1], errors="strict")


# (filename parameter as sent, the display name kept)
HOSTILE_NAMES = [
    (b'a\\"; filename*=UTF-8\'\'evil.sh; x=\\".jsonl', "a\"; filename*=UTF-8''evil.sh; x=\".jsonl"),
    (b"bell\x07\x01 esc\x1b[31m red\x7f.jsonl", "bell esc[31m red.jsonl"),
    ("日本語.jsonl".encode(), "日本語.jsonl"),
    (b"\xff\xfe.jsonl", "\xff\xfe.jsonl"),  # not UTF-8: taken byte for byte
    (b"\x01\x02", "upload.jsonl"),  # nothing left
    (b"n" * 4000 + b".jsonl", "n" * 255),
]


def test_hostile_and_non_ascii_names_download_for_the_owner_and_the_admin(app: ServeApp) -> None:
    owner, other = new_tenant(app), new_tenant(app)
    content = b'{"custom_id": "1"}\n'
    admin_console = app.auth_base_url.removesuffix("/v1") + "/console"
    for sent, kept in HOSTILE_NAMES:
        uploaded = raw_upload(app, owner, sent, content)
        assert uploaded.status_code == 200, (sent, uploaded.text[:300])
        file_id = uploaded.json()["id"]
        try:
            assert uploaded.json()["filename"] == kept
            downloads = [
                call(app, owner, "GET", f"/files/{file_id}/content"),
                call(app, ADMIN, "GET", f"/files/{file_id}/content"),
                httpx.get(f"{admin_console}/files/{file_id}/content", timeout=60,
                          headers={"Authorization": f"Bearer {ADMIN_KEY}"}),
            ]
            for response in downloads:
                assert response.status_code == 200, (sent, response.status_code, response.text[:300])
                assert response.content == content and response.headers["content-length"] == str(len(content))
                assert response.headers["content-disposition"] == content_disposition(kept)
                assert shown_name(response) == kept
            assert call(app, ADMIN, "GET", f"/files/{file_id}").json()["filename"] == kept
            assert call(app, other, "GET", f"/files/{file_id}/content").status_code == 404
        finally:
            assert call(app, owner, "DELETE", f"/files/{file_id}").status_code == 200

    # A part header over python-multipart's 4 KiB: a 400 naming the file, not a 500.
    too_long = raw_upload(app, owner, b"n" * 5000, content)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "file"

    # The official client: a non-ASCII name, and a quote (httpx sends it as %22, kept as sent).
    client = openai_client(app, owner)
    for name in ("日本語.jsonl", 'say "hi".jsonl'):
        stored = client.files.create(file=(name, content), purpose="batch")
        try:
            raw = client.files.with_raw_response.content(stored.id)
            assert raw.content == content
            assert unquote(raw.headers["content-disposition"].split("filename*=UTF-8''", 1)[1]) == stored.filename
            assert stored.filename in (name, name.replace('"', "%22"))
        finally:
            client.files.delete(stored.id)


@pytest.mark.parametrize("body, content_type", [
    (b"not a form", "multipart/form-data; boundary=B"),
    (b'--B\r\nContent-Disposition: form-data; name="file"; filename="x"\r\n\r\n{}\n',  # ends early
     "multipart/form-data; boundary=B"),
    (b'{"file": "x"}', "application/json"),
    (b"", "multipart/form-data"),
])
def test_broken_upload_bodies_are_400_naming_the_file(app: ServeApp, body: bytes, content_type: str) -> None:
    response = httpx.post(f"{app.base_url}/files", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] == "file"


def test_purpose_is_checked_wherever_it_comes_in_the_form(app: ServeApp) -> None:
    content = b'{"custom_id": "1"}\n'
    for order in ("first", "last"):
        purpose = b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nassistants\r\n'
        file = b'--B\r\nContent-Disposition: form-data; name="file"; filename="p.jsonl"\r\n\r\n' + content + b"\r\n"
        body = (purpose + file if order == "first" else file + purpose) + b"--B--\r\n"
        response = httpx.post(f"{app.base_url}/files", content=body, timeout=60,
                              headers={"Content-Type": "multipart/form-data; boundary=B"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "purpose", (order, response.text)
    missing = httpx.post(f"{app.base_url}/files", files={"file": ("p.jsonl", content)}, timeout=60)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "purpose"
    assert not [f for f in app.client().files.list() if f.filename == "p.jsonl"]
