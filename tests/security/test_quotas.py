"""Issue 10, item 6: one tenant cannot exhaust the head node.

The auth app's quotas (tests/fixtures.py): 4 files and 1 MB of files per key, 1 unfinished batch
per key, 2 unfinished batches in all, 400 lines per batch. Each limit is tested on both sides: it
holds, and traffic under it (another key, or after freeing room) flows.
"""

from __future__ import annotations

import openai
import pytest

from tests.fixtures import ServeApp
from tests.security.tenants import Tenant, assert_openai_error, call, new_tenant, openai_client, upload
from tests.security.test_tenants import BATCH, LINE, LONG, SLOW_S, create_batch, end_batch

pytestmark = pytest.mark.serve


def refused_upload(app: ServeApp, who: Tenant, content: bytes) -> dict[str, object]:
    response = call(app, who, "POST", "/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    return assert_openai_error(response, 403, "quota_exceeded")


def test_stored_files_per_key_count_and_bytes(serve_app: ServeApp) -> None:
    app = serve_app
    dave, erin = new_tenant(app), new_tenant(app)
    files = [upload(app, dave) for _ in range(4)]
    assert refused_upload(app, dave, LINE)["param"] == "file"
    upload(app, erin)  # another key's quota is its own
    assert call(app, dave, "DELETE", f"/files/{files[0]}").status_code == 200
    upload(app, dave)  # room again after a delete

    big = b"x" * 600_000 + b"\n"
    upload(app, erin, big)
    refused_upload(app, erin, big)  # 600 kB more would pass the 1 MB quota: refused as it arrives
    listed = call(app, erin, "GET", "/files").json()["data"]
    assert sum(f["bytes"] for f in listed) < 1_000_000 and len(listed) == 2  # nothing half-stored
    upload(app, erin, b"y" * 1000 + b"\n")  # under the quota: still flows


def test_concurrent_batches_per_key_and_in_total(app: ServeApp) -> None:
    frank, gina, hal = new_tenant(app), new_tenant(app), new_tenant(app)
    app.upstream.configure("slow", delay_s=SLOW_S)  # the batches run until cancelled (see LONG)
    started: list[tuple[Tenant, str]] = []
    try:
        first = create_batch(app, frank, upload(app, frank, LONG))
        started.append((frank, first["id"]))
        again = call(app, frank, "POST", "/batches", json={"input_file_id": first["input_file_id"], **BATCH})
        assert_openai_error(again, 403, "quota_exceeded")

        second = create_batch(app, gina, upload(app, gina, LONG))  # another key: under both limits
        started.append((gina, second["id"]))
        hals_file = upload(app, hal, LINE)
        full = call(app, hal, "POST", "/batches", json={"input_file_id": hals_file, **BATCH})
        assert_openai_error(full, 503, "overloaded")
        assert int(full.headers["retry-after"]) >= 1

        end_batch(app, frank, first["id"])  # an ended batch frees both quotas
        third = create_batch(app, hal, hals_file)
        started.append((hal, third["id"]))
    finally:
        app.upstream.reset()
        for owner, batch_id in started:
            end_batch(app, owner, batch_id)


def test_a_batch_over_the_line_limit_is_refused_with_the_field_named(app: ServeApp) -> None:
    # LONG is 400 lines, the limit; one more is a 400 naming input_file_id before any job starts.
    ivan = new_tenant(app)
    over = upload(app, ivan, LONG + LINE.replace(b'"1"', b'"400"'))
    client = openai_client(app, ivan)
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=over, endpoint="/v1/chat/completions", completion_window="24h")
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == "input_file_id" and "at most 400" in error["message"]
    assert call(app, ivan, "GET", "/batches").json()["data"] == []  # no batch, no job
    at_limit = upload(app, ivan, LONG)
    end_batch(app, ivan, create_batch(app, ivan, at_limit)["id"])
