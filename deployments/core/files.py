"""Pure pieces of the Files API: display names, download headers, byte ranges, line counts.

No I/O and nothing heavy: the Gateway's upload and download code (``deployments.gateway.files``)
and the BatchStore call these, and ``tests/unit/test_files.py`` tests them without Ray.

- ``clean_filename``: the display name kept for an upload — the client's name without any
  directory part and without control characters (C0/C1 controls, Unicode format characters
  such as bidi overrides, line and paragraph separators), at most 255 characters.
- ``content_disposition``: the RFC 6266 header of a download, ``attachment;
  filename="<ASCII fallback>"; filename*=UTF-8''<percent-encoded name>``. Every byte of it is
  ASCII and neither value can hold a ``"``, ``;`` or ``\\``, so a name cannot add parameters.
- ``parse_range``: one ``Range: bytes=…`` request header against a file's size (RFC 9110 §14).
- ``LineCounter``: non-blank lines of a byte stream that arrives in pieces.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

from deployments.errors import RangeNotSatisfiable

MAX_FILENAME_CHARS = 255
DEFAULT_FILENAME = "upload.jsonl"
# Unicode categories dropped from names: controls, format characters (bidi overrides, zero-width
# joiners: they can make "gpj.jsonl" read as something else), surrogates, line/paragraph separators.
_DROPPED = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_FALLBACK_SAFE = re.compile(r"[^A-Za-z0-9 ._()+,=@\[\]-]+")
_RANGE = re.compile(r"^\s*bytes\s*=\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*$", re.IGNORECASE)


def clean_filename(name: str | None, default: str = DEFAULT_FILENAME) -> str:
    """The display name to keep for an upload named ``name`` (``default`` if nothing is left)."""
    text = "".join(c for c in (name or "") if unicodedata.category(c) not in _DROPPED)
    base = text.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base[:MAX_FILENAME_CHARS].strip() or default


def ascii_fallback(name: str) -> str:
    """An ASCII stand-in for ``name`` for clients that ignore ``filename*``: accents folded
    (``é`` → ``e``), every other run of unsafe characters one ``_``."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    safe = _FALLBACK_SAFE.sub("_", folded).strip()
    return safe if safe.strip("._ ") else "download"


def content_disposition(filename: str, disposition: str = "attachment") -> str:
    """The ``Content-Disposition`` value of a download of a file displayed as ``filename``."""
    name = clean_filename(filename, default="download")  # names stored before the cleaning rule too
    return f"{disposition}; filename=\"{ascii_fallback(name)}\"; filename*=UTF-8''{quote(name, safe='')}"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte (inclusive) a ``Range`` header asks of a ``size``-byte file.

    None: send the whole file — no header, or one a server may ignore (RFC 9110 §14.2: another
    unit, several ranges, a syntax error, last before first). ``RangeNotSatisfiable`` (416) when
    the range starts at or past the end, or is an empty suffix (``bytes=-0``).
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first_text, last_text = match.groups()
    if not first_text and not last_text:
        return None
    unsatisfiable = RangeNotSatisfiable(f"Range: the file has {size} bytes; '{header[:60]}' asks for none of them.",
                                        param="Range")
    if not first_text:  # bytes=-N: the last N bytes
        suffix = int(last_text)
        if suffix == 0 or size == 0:
            raise unsatisfiable
        return max(0, size - suffix), size - 1
    first = int(first_text)
    if first >= size:
        raise unsatisfiable
    last = int(last_text) if last_text else size - 1
    if last < first:
        return None
    return first, min(last, size - 1)


class LineCounter:
    """Non-blank lines (a line with a byte other than ASCII whitespace) of bytes fed in pieces.

    Counts as ``for raw in file: lines += bool(raw.strip())`` would over the whole stream, with
    memory bounded by one piece however long a line is.
    """

    def __init__(self) -> None:
        self.complete = 0  # non-blank lines ended by a newline
        self._open = False  # the line in progress has a non-blank byte

    def feed(self, data: bytes) -> None:
        *ended, rest = data.split(b"\n")
        for part in ended:
            if self._open or part.strip():
                self.complete += 1
            self._open = False
        if rest.strip():
            self._open = True

    @property
    def lines(self) -> int:
        """Non-blank lines so far, the unterminated last one included."""
        return self.complete + self._open
