"""The pure pieces of the Files API: display names, Content-Disposition, Range, line counts, the
streaming multipart form (no Ray)."""

from __future__ import annotations

import io
import random
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest

from deployments.core.files import LineCounter, clean_filename, content_disposition, parse_range
from deployments.core.uploadform import UploadForm
from deployments.errors import InvalidRequest, RangeNotSatisfiable
from jobs.batchlines import MAX_LINE_BYTES, count_lines, iter_lines, read_lines


@pytest.mark.parametrize(("given", "kept"), [
    ("in.jsonl", "in.jsonl"),
    ("../../etc/passwd", "passwd"),
    ("C:\\Users\\me\\in.jsonl", "in.jsonl"),
    ("a\x00b\x07c\x1b[31m\x7f\x85.jsonl", "abc[31m.jsonl"),
    ("tab\there\r\nnew.jsonl", "tabherenew.jsonl"),
    ("evil\u202egpj.jsonl", "evilgpj.jsonl"),  # a bidi override is dropped
    ("日本語.jsonl", "日本語.jsonl"),
    ('a"; filename*=x.jsonl', 'a"; filename*=x.jsonl'),  # kept for display; harmless in the header
    ("", "upload.jsonl"),
    (None, "upload.jsonl"),
    ("\x01\x02", "upload.jsonl"),
    ("x" * 300, "x" * 255),
])
def test_clean_filename_keeps_display_names_without_controls(given: str | None, kept: str) -> None:
    assert clean_filename(given) == kept


@pytest.mark.parametrize("name", [
    "in.jsonl", "日本語.jsonl", 'a"b.jsonl', 'x"; filename*=UTF-8\'\'evil.sh; y="', "back\\slash.jsonl",
    "semi;colon, comma.jsonl", "café résumé.jsonl", "100% done.jsonl", "emoji 🎉.jsonl", "a\x00\r\nb.jsonl",
])
def test_content_disposition_is_ascii_and_names_the_file_exactly_once(name: str) -> None:
    header = content_disposition(name)
    header.encode("ascii")  # an HTTP header value that any server can send
    assert header.startswith('attachment; filename="')
    fallback = header.split('filename="', 1)[1].split('"', 1)[0]
    assert header == f"attachment; filename=\"{fallback}\"; filename*=UTF-8''" + header.rsplit("''", 1)[1]
    assert not any(c in fallback for c in '"\\;') and all(" " <= c < "\x7f" for c in fallback)
    # Neither value holds a ';' or '"': the parameters are exactly these two.
    assert [part.split("=", 1)[0].strip() for part in header.split(";")] == ["attachment", "filename", "filename*"]
    extended = header.rsplit("; filename*=", 1)[1]
    assert extended.startswith("UTF-8''") and all(c.isalnum() or c in "%-._~" for c in extended[7:])
    assert unquote(extended[7:], errors="strict") == clean_filename(name)  # RFC 5987: what clients show


def test_ascii_fallback_folds_accents_and_replaces_the_rest() -> None:
    assert 'filename="cafe resume.jsonl"' in content_disposition("café résumé.jsonl")
    assert 'filename="_.jsonl"' in content_disposition("日本語.jsonl")
    assert 'filename="download"' in content_disposition("日本語")
    assert "filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.jsonl" in content_disposition("日本語.jsonl")


@pytest.mark.parametrize(("header", "size", "span"), [
    (None, 10, None),
    ("", 10, None),
    ("bytes=0-3", 10, (0, 3)),
    ("bytes=2-", 10, (2, 9)),
    ("bytes=-3", 10, (7, 9)),
    ("bytes=-30", 10, (0, 9)),
    ("bytes=5-100", 10, (5, 9)),
    ("BYTES = 1 - 1", 10, (1, 1)),
    ("bytes=9-9", 10, (9, 9)),
    ("bytes=3-2", 10, None),  # invalid: ignored, the whole file
    ("bytes=0-1,4-5", 10, None),  # several ranges: ignored
    ("items=0-1", 10, None),
    ("bytes=abc", 10, None),
    ("bytes=-", 10, None),
    ("bytes=١-٢", 10, None),  # digits of another script are not digits here
    ("bytes=" + "9" * 5000 + "-", 10, None),  # no int() of thousands of digits
])
def test_parse_range(header: str | None, size: int, span: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == span


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10), ("bytes=0-", 0), ("bytes=-5", 0),
    ("bytes=9999999999999999999-", 10),
])
def test_unsatisfiable_ranges_are_416_naming_the_header(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as refused:
        parse_range(header, size)
    assert refused.value.status_code == 416 and refused.value.param == "Range"


def test_line_counter_counts_non_blank_lines_however_the_bytes_are_cut() -> None:
    text = b'{"a": 1}\n\n   \n{"b": 2}\r\n\t\n{"c"' + b"x" * 5000 + b"}\n  \n{\"last\": 0}"
    expected = sum(bool(raw.strip()) for raw in text.splitlines(keepends=True))
    rng = random.Random(7)
    for _ in range(50):
        counter = LineCounter()
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 20)))
        for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
            counter.feed(text[start:end])
        assert counter.lines == expected == 4
    empty = LineCounter()
    empty.feed(b"\n \n\t")
    assert empty.lines == 0


def multipart(fields: dict[str, str], file: tuple[str, bytes]) -> tuple[str, bytes]:
    """A body as httpx (the openai client's transport) encodes it."""
    request = httpx.Request("POST", "http://x/v1/files", data=fields, files={"file": file})
    return request.headers["content-type"], request.read()


def feed_in_pieces(form: UploadForm, body: bytes, piece: int) -> bytes:
    out = b"".join(form.feed(body[i:i + piece]) for i in range(0, len(body), piece))
    form.finish()
    return out


@pytest.mark.parametrize("piece", [1, 7, 1000, 1 << 20])
def test_upload_form_hands_out_the_file_bytes_as_they_arrive(piece: int) -> None:
    content = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"
    content_type, body = multipart({"purpose": "batch"}, ("日本語.jsonl", content))
    form = UploadForm(content_type)
    assert feed_in_pieces(form, body, piece) == content
    assert form.fields == {"purpose": "batch"} and form.filename == "日本語.jsonl"


def test_upload_form_reads_quoted_names_and_drops_controls() -> None:
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\\"b\x01\x1b.jsonl"\r\n\r\n'
            b'{"x": 1}\n\r\n--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--B--\r\n')
    form = UploadForm("multipart/form-data; boundary=B")
    assert feed_in_pieces(form, body, 5) == b'{"x": 1}\n'
    assert form.filename == 'a"b.jsonl' and form.fields == {"purpose": "batch"}


@pytest.mark.parametrize(("content_type", "body", "param"), [
    ("application/json", b"{}", "file"),
    (None, b"", "file"),
    ("multipart/form-data", b"", "file"),  # no boundary
    ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc", "file"),
    ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
     b"batch\r\n--B--\r\n", "file"),  # no file part
    ("multipart/form-data; boundary=B", b"garbage without a boundary", "file"),
    ("multipart/form-data; boundary=B", b"--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
     + b"x" * 5000 + b"\r\n--B--\r\n", "purpose"),
    ("multipart/form-data; boundary=B", b"".join(
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\nx\r\n' for _ in range(2)
    ) + b"--B--\r\n", "file"),
])
def test_bad_forms_are_400_naming_the_field(content_type: str | None, body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        form = UploadForm(content_type)
        feed_in_pieces(form, body, 3)
    assert refused.value.status_code == 400 and refused.value.param == param


def test_batch_input_lines_over_the_limit_are_skipped_unread(tmp_path: Path) -> None:
    text = b'{"a": 1}\n' + b"x" * 100 + b"\n\n" + b"y" * 11 + b"\n" + b"z" * 10 + b"\n" + b"w" * 25
    lines = list(read_lines(io.BytesIO(text), limit=10))
    assert lines == [b'{"a": 1}\n', None, b"\n", None, b"z" * 10 + b"\n", None]
    # Exactly at the limit (the newline not counted) is read; the line after a long one is intact.
    assert list(read_lines(io.BytesIO(b"a" * 10 + b"\nb\n"), limit=10)) == [b"a" * 10 + b"\n", b"b\n"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"x" * (MAX_LINE_BYTES + 1) + b"\n" + b'{"b": 2}\n')
    assert count_lines(path) == 2
    with path.open("rb") as f:
        assert list(iter_lines(f)) == [(1, None), (2, b'{"b": 2}\n')]
