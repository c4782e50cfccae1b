"""What only the PostgreSQL backend has: a URL with a secret, a server that can go away."""

from __future__ import annotations

import socket

import psycopg
import pytest

from deployments.errors import Overloaded
from deployments.store import RunStore
from deployments.store import postgres as backend
from deployments.store.postgres import PostgresDatabase, masked
from tests.postgres import PostgresServer


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://pf:s3cret@db:5432/app", "postgresql://pf:***@db:5432/app"),
        ("postgresql://pf:p%40ss@db/app?sslmode=require", "postgresql://pf:***@db/app?sslmode=require"),
        ("postgres://db/app?user=pf&password=s3cret", "postgres://db/app?user=pf&password=***"),
        ("postgresql://pf@db/app", "postgresql://pf@db/app"),
    ],
)
def test_logged_location_masks_the_password(url: str, shown: str) -> None:
    assert masked(url) == shown


def test_unreachable_server_fails_at_start_with_the_reason_and_no_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe is closed
    with pytest.raises(RuntimeError) as info:
        RunStore(f"postgresql://pf:s3cret@127.0.0.1:{port}/app")
    message = str(info.value)
    assert "cannot connect to PostgreSQL at postgresql://pf:***@127.0.0.1" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://pf:s3%zzcret@127.0.0.1/app", "percent-encoded"),  # libpq quotes the bad token
        ("postgresql://pf:s3cret@127.0.0.1/app?bogus=1", "bogus"),
    ],
)
def test_a_bad_url_is_a_value_error_naming_no_password(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match="not a valid PostgreSQL URL") as info:
        PostgresDatabase(url)
    assert "s3" not in str(info.value) and reason in str(info.value)


def test_a_killed_connection_is_replaced_before_use(postgres_server: PostgresServer) -> None:
    with RunStore(postgres_server.fresh_url()) as store:
        store.create_run(task="t", input={}, owner="a", idempotency_key=None, now=1)
        with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'promptfleet' AND pid <> pg_backend_pid()"
            ).fetchall()
        assert killed, "the store held no connection"
        assert store.count_queued() == 1  # the pool's check saw the dead connection and reconnected


def test_no_connection_to_be_had_is_overloaded_not_a_driver_error(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "POOL_TIMEOUT_S", 0.2)
    database = PostgresDatabase(postgres_server.fresh_url(), max_connections=1)
    try:
        with database.autocommit(), pytest.raises(Overloaded) as info, database.autocommit():
            pass  # the only connection is taken by the outer block
        assert info.value.retry_after == backend.RETRY_AFTER_S and info.value.status_code == 503
        assert "unavailable" in info.value.message
    finally:
        database.close()
