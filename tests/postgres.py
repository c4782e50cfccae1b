"""A throwaway PostgreSQL server for the tests: no service, no Docker, nothing left behind.

``postgres_server`` (session): ``initdb`` into a fresh temporary directory, then ``pg_ctl start``
with TCP on 127.0.0.1 only (a free port) and the unix socket inside that directory; at the end
``pg_ctl stop -m fast`` and the directory is removed. Started only if a test asks for it.
Durability settings are off (``fsync``, ``synchronous_commit``): a crash loses a test database.

``postgres_server.fresh_url()`` gives a URL whose ``search_path`` is a new, empty schema, so
every test (every hypothesis example, even) starts from nothing in a millisecond; the schemas
are dropped with the server.

Binaries: the newest ``/usr/lib/postgresql/*/bin`` (Debian's layout), else ``initdb`` on PATH.
Without them the tests skip — or fail, when ``PROMPTFLEET_REQUIRE_POSTGRES=1`` (CI installs
PostgreSQL and sets it, so a skip can never hide there). PostgreSQL refuses to run as root:
as root, the server runs as the ``postgres`` system user through ``runuser``.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

REQUIRE_ENV = "PROMPTFLEET_REQUIRE_POSTGRES"
BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"
SUPERUSER = "postgres"
DATABASE = "promptfleet_test"
START_TIMEOUT_S = 60


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def find_bin_dir() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``: the highest installed version wins."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.name))

    candidates = sorted(glob.glob(f"{BIN_GLOB}/initdb"), key=version)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    password: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = 0
    _schemas: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = DATABASE, **query: str) -> str:
        auth = f"{SUPERUSER}:{urllib.parse.quote(self.password)}"
        tail = f"?{urllib.parse.urlencode(query, quote_via=urllib.parse.quote)}" if query else ""
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}{tail}"

    def fresh_url(self) -> str:
        """A URL whose tables land in a new, empty schema."""
        schema = f"test_{next(self._schemas)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        return self.url(options=f"-c search_path={schema}")

    # -- lifecycle -----------------------------------------------------------------------

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / tool), *args]
        # PostgreSQL refuses to run as root: run its tools as its own system user.
        return ["runuser", "-u", SERVER_USER, "--", *command] if os.geteuid() == 0 else command

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT_S) -> None:
        done = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, timeout=timeout, check=False
        )
        if done.returncode != 0:
            log = self.log_file.read_text()[-3000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")

    def init(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if os.geteuid() == 0:
            server_user = pwd.getpwnam(SERVER_USER)
            for path in (self.root, password_file):
                os.chown(path, server_user.pw_uid, server_user.pw_gid)
        self._run(
            "initdb", "--pgdata", str(self.data_dir), "--username", SUPERUSER, "--pwfile", str(password_file),
            "--auth", "scram-sha-256", "--encoding", "UTF8", "--no-locale", "--no-sync",
        )
        password_file.unlink()

    def start(self) -> None:
        (self.root / "socket").mkdir()
        if os.geteuid() == 0:
            server_user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root / "socket", server_user.pw_uid, server_user.pw_gid)
        for attempt in range(3):  # the free port may be taken between probe and bind
            self.port = _free_port()
            options = [
                "-c", "listen_addresses=127.0.0.1", "-p", str(self.port),
                "-c", f"unix_socket_directories={self.root / 'socket'}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            ]
            try:
                self._run(
                    "pg_ctl", "--pgdata", str(self.data_dir), "--log", str(self.log_file), "--wait",
                    "--timeout", str(START_TIMEOUT_S), "--options", shlex.join(options), "start",
                )
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "--pgdata", str(self.data_dir), "--mode", "fast", "--wait", "stop")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable(f"PostgreSQL is not installed (no {BIN_GLOB}/initdb, no initdb on PATH)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            _unavailable(f"running as root needs a {SERVER_USER!r} system user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            _unavailable("running as root needs `runuser` to run PostgreSQL as another user")
    # Directly under the system temp dir: pytest's own tmp dirs are private to root, and the
    # server's user must be able to reach its data directory.
    server = PostgresServer(bin_dir=bin_dir, root=Path(tempfile.mkdtemp(prefix="promptfleet-pg-")))
    try:
        server.init()
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.root, ignore_errors=True)
