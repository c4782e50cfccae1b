"""Suite-wide guards.

No test may reach a real LLM provider: in this process every outbound
connection must go to loopback (the check of pydantic-ai's ALLOW_MODEL_REQUESTS,
done at the socket so nothing slips past it), and Ray replicas get
PROMPTFLEET_UPSTREAM_HOSTS=127.0.0.1 so a worker refuses any other upstream.
Upstream API keys are removed from the environment.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

for _name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_BASE_URL"):
    os.environ.pop(_name, None)

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address:
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise RuntimeError(f"tests may only connect to loopback, not {host!r}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(address)
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(address)
    return _real_connect_ex(self, address)


@pytest.fixture(autouse=True, scope="session")
def _only_loopback() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _real_connect_ex  # type: ignore[method-assign]


# The session's Ray cluster, Serve app and fake upstream, and a throwaway PostgreSQL server
# (each started only if a test asks for it).
pytest_plugins = ["tests.fixtures", "tests.postgres"]
