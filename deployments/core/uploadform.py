"""An upload's multipart/form-data body, parsed as it arrives (sans-IO: bytes in, file bytes out).

``UploadForm.feed(chunk)`` takes the next piece of the request body and returns the bytes of the
``file`` part it held, so the caller can write them on without ever holding the whole file; the
other parts (``purpose``) are small form fields, kept in ``fields`` up to ``max_field_bytes``
each. Built on python-multipart's streaming ``MultipartParser`` (the parser Starlette's form
handling uses, without its spooling of each file to a temporary file).

Every malformed body is an ``InvalidRequest`` naming ``file`` (or the oversized field), never an
exception of the parser.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from deployments.core.files import clean_filename
from deployments.errors import InvalidRequest

FILE_FIELD = "file"
MAX_FIELDS = 16
# python-multipart's bounds on a part's headers: 8 of them, each line up to 4 KiB.
MALFORMED = "file: the multipart body is malformed (or a part has over 8 headers, or a header over 4 KiB)"


def _decode(raw: bytes) -> str:
    # Browsers and httpx send UTF-8; anything else is taken byte for byte (as Starlette does).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class UploadForm:
    """One multipart body with one ``file`` part and a few small fields."""

    def __init__(self, content_type: str | None, max_field_bytes: int = 1024) -> None:
        kind, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise InvalidRequest(
                "file: send the upload as multipart/form-data with a `file` part and `purpose`", param="file"
            )
        self.max_field_bytes = max_field_bytes
        self.fields: dict[str, str] = {}
        self.filename: str | None = None  # the file part's display name, once its headers arrived
        self.has_file = False
        self.ended = False
        self._out = bytearray()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._part: str | None = None  # FILE_FIELD, a field's name, or None (between parts)
        self._value = bytearray()
        self._parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })

    def feed(self, chunk: bytes) -> bytes:
        """Parse ``chunk``; return the file bytes it held (often all of it, or nothing)."""
        try:
            self._parser.write(chunk)
        except MultipartParseError:
            raise InvalidRequest(MALFORMED, param="file") from None
        data = bytes(self._out)
        self._out.clear()
        return data

    def finish(self) -> None:
        """The body has ended: check it was a whole form with a file."""
        try:
            self._parser.finalize()
        except MultipartParseError:
            raise InvalidRequest(MALFORMED, param="file") from None
        if not self.ended:
            raise InvalidRequest("file: the multipart body ended early", param="file")
        if not self.has_file:
            raise InvalidRequest("file: a `file` part is required", param="file")

    # -- parser callbacks ----------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers.clear()
        self._value.clear()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b"").decode("latin-1"))
        name = _decode(options.get(b"name", b""))
        if name == FILE_FIELD:
            if self.has_file:
                raise InvalidRequest("file: send one file per upload", param="file")
            self.has_file = True
            self.filename = clean_filename(_decode(options[b"filename"]) if b"filename" in options else None)
        elif len(self.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"file: the form has more than {MAX_FIELDS} fields", param="file")
        self._part = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD:
            self._out.extend(data[start:end])
            return
        self._value.extend(data[start:end])
        if len(self._value) > self.max_field_bytes:
            param = (self._part or "")[:64] or "file"
            raise InvalidRequest(f"{param}: longer than {self.max_field_bytes} bytes", param=param)

    def _part_end(self) -> None:
        if self._part is not None and self._part != FILE_FIELD:
            self.fields[self._part] = _decode(bytes(self._value))
        self._part = None

    def _end(self) -> None:
        self.ended = True
