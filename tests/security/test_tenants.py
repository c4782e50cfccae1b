"""Two tenants over every route, and the admin across tenants (issue 10, item 8).

A tenant can read, list, cancel, download or delete only its own runs, files and batches: every
id of another tenant answers exactly like an unknown id (404, same error), so ids cannot be
probed. The admin lists, inspects and cancels any tenant's runs and batches; revoking a key
cancels its queued runs and unfinished batches.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.fixtures import ServeApp
from tests.security.tenants import ADMIN, Tenant, assert_openai_error, call, new_tenant, upload
from tests.waiting import wait_for

pytestmark = pytest.mark.serve

BATCH = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}
LINE = b'{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fake", ' \
       b'"messages": [{"role": "user", "content": "hi"}]}}\n'
# With the upstream answering after SLOW_S, a batch of LONG lines runs for a while (the batch job
# keeps 64 lines in flight): long enough to be seen, cancelled and counted while it runs.
SLOW_S = 8
LONG = b"".join(LINE.replace(b'"1"', f'"{n}"'.encode()) for n in range(400))
FINISHED = {"completed", "failed", "cancelled", "expired"}


def submit(app: ServeApp, who: Tenant, text: str = "x") -> dict[str, Any]:
    response = call(app, who, "POST", "/tasks/label_fake/submit", json={"input": {"text": text}})
    assert response.status_code == 202, response.text
    return dict(response.json())


def create_batch(app: ServeApp, who: Tenant, file_id: str) -> dict[str, Any]:
    response = call(app, who, "POST", "/batches", json={"input_file_id": file_id, **BATCH})
    assert response.status_code == 200, response.text
    return dict(response.json())


def end_batch(app: ServeApp, who: Tenant, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    """Cancel the batch (if it still runs) and wait until it has ended, freeing the batch quotas."""
    call(app, who, "POST", f"/batches/{batch_id}/cancel")
    seen: list[dict[str, Any]] = []

    def ended() -> dict[str, Any] | None:
        seen[:] = [dict(call(app, who, "GET", f"/batches/{batch_id}").json())]
        return seen[0] if seen[0]["status"] in FINISHED else None

    return wait_for(ended, timeout_s=timeout, interval_s=0.5, message=lambda: f"batch {batch_id} did not end: {seen}")


def same_shape(foreign: Any, unknown: Any, ids: tuple[str, str]) -> None:
    """Both 404, with the same error once the two ids (and the two requests' own ids) are put aside."""
    one, other = assert_openai_error(foreign, 404), assert_openai_error(unknown, 404)
    assert one.pop("request_id") != other.pop("request_id")  # every request has its own
    assert re.sub(re.escape(ids[0]), "<id>", str(one)) == re.sub(re.escape(ids[1]), "<id>", str(other))


def unknown_like(object_id: str) -> str:
    """An id of the same shape that nobody owns."""
    tail = "00000000" if object_id[-8:] != "00000000" else "11111111"
    return object_id[:-8] + tail


def test_no_tenant_touches_another_tenants_objects(app: ServeApp) -> None:
    alice, bob = new_tenant(app), new_tenant(app)
    app.upstream.configure("slow", delay_s=SLOW_S)
    run = submit(app, alice)
    file_id = upload(app, alice, LONG)
    batch = create_batch(app, alice, file_id)
    try:
        content = call(app, alice, "GET", f"/files/{file_id}/content").content
        by_id = [
            ("GET", "/runs/{}", run["id"]),
            ("GET", "/runs/{}?wait=0.5", run["id"]),
            ("POST", "/runs/{}/cancel", run["id"]),
            ("GET", "/files/{}", file_id),
            ("GET", "/files/{}/content", file_id),
            ("DELETE", "/files/{}", file_id),
            ("GET", "/batches/{}", batch["id"]),
            ("POST", "/batches/{}/cancel", batch["id"]),
        ]
        for method, template, object_id in by_id:
            other = unknown_like(object_id)
            assert other != object_id
            same_shape(call(app, bob, method, template.format(object_id)),
                       call(app, bob, method, template.format(other)), (object_id, other))
        same_shape(call(app, bob, "POST", "/batches", json={"input_file_id": file_id, **BATCH}),
                   call(app, bob, "POST", "/batches", json={"input_file_id": unknown_like(file_id), **BATCH}),
                   (file_id, unknown_like(file_id)))

        # Lists show only the caller's objects; asking for another owner's is for the admin only.
        for path, key in (("/runs", "data"), ("/files", "data"), ("/batches", "data")):
            listed = call(app, bob, "GET", path)
            assert listed.status_code == 200 and listed.json()[key] == [], (path, listed.text)
        for path in ("/runs", "/batches"):
            assert_openai_error(call(app, bob, "GET", path, params={"owner": alice.id}), 403, "permission_denied")
        usage = call(app, bob, "GET", "/usage", params={"key_id": alice.id})
        assert usage.status_code == 200 and all(row["key_id"] == bob.id for row in usage.json()["data"])
        # Key management is the admin's.
        assert_openai_error(call(app, bob, "GET", "/admin/keys"), 403, "permission_denied")
        assert_openai_error(call(app, bob, "POST", "/admin/keys", json={"name": "mine"}), 403)
        assert_openai_error(call(app, bob, "DELETE", f"/admin/keys/{alice.id}"), 403)

        # Nothing Bob did changed Alice's objects.
        assert call(app, alice, "GET", f"/runs/{run['id']}").json()["status"] != "cancelled"
        assert call(app, alice, "GET", f"/files/{file_id}/content").content == content
        assert call(app, alice, "GET", f"/batches/{batch['id']}").json()["cancelling_at"] is None
        assert call(app, alice, "POST", "/chat/completions",
                    json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200

        # The admin sees and lists every tenant's runs and batches, and can narrow to one owner.
        assert call(app, ADMIN, "GET", f"/runs/{run['id']}").json()["id"] == run["id"]
        assert call(app, ADMIN, "GET", f"/batches/{batch['id']}").json()["id"] == batch["id"]
        everyone = {r["id"] for r in call(app, ADMIN, "GET", "/runs", params={"limit": 1000}).json()["data"]}
        bobs = submit(app, bob)
        assert run["id"] in everyone
        only_alice = {r["id"] for r in call(app, ADMIN, "GET", "/runs", params={"owner": alice.id}).json()["data"]}
        assert only_alice == {run["id"]} and bobs["id"] not in only_alice
        admin_batches = call(app, ADMIN, "GET", "/batches", params={"owner": alice.id}).json()["data"]
        assert [b["id"] for b in admin_batches] == [batch["id"]]
        # The admin cancels Alice's batch.
        assert call(app, ADMIN, "POST", f"/batches/{batch['id']}/cancel").json()["status"] in (
            "cancelling", "cancelled"
        )
    finally:
        app.upstream.reset()
        end_batch(app, alice, batch["id"])


def test_revoking_a_key_cancels_its_queued_runs_and_batches(app: ServeApp) -> None:
    carol, dave = new_tenant(app), new_tenant(app)
    # Every upstream call takes a while, so the auth app's four runner slots fill and the rest queue.
    app.upstream.configure("slow", delay_s=SLOW_S)
    batch = create_batch(app, carol, upload(app, carol, LONG))
    daves = submit(app, dave)
    runs = [submit(app, carol, f"r{n}") for n in range(12)]  # 12 runs, 4 slots, each call takes SLOW_S
    try:
        seen = {r["id"]: call(app, carol, "GET", f"/runs/{r['id']}").json()["status"] for r in runs}
        queued = [r for r in runs if seen[r["id"]] == "queued"]
        assert queued, f"the runners took every run: nothing queued to cancel: {seen}"
        # The admin cancels one of Carol's queued runs.
        assert call(app, ADMIN, "POST", f"/runs/{queued[0]['id']}/cancel").json()["status"] == "cancelled"

        revoked = call(app, ADMIN, "DELETE", f"/admin/keys/{carol.id}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None

        listed = call(app, ADMIN, "GET", "/runs", params={"owner": carol.id}).json()["data"]
        statuses = {r["id"]: r["status"] for r in listed}
        assert set(statuses) == {r["id"] for r in runs}
        assert "queued" not in statuses.values(), statuses
        assert statuses[queued[0]["id"]] == "cancelled"
        # Runs still queued at the revocation were cancelled by it (some queued earlier may have
        # started meanwhile; running runs finish).
        assert any(status == "cancelled" for run_id, status in statuses.items() if run_id != queued[0]["id"]), statuses
        assert call(app, ADMIN, "GET", f"/batches/{batch['id']}").json()["cancelling_at"] is not None
        # Another tenant's work is untouched.
        assert call(app, dave, "GET", f"/runs/{daves['id']}").json()["status"] in ("queued", "running", "succeeded")
    finally:
        app.upstream.reset()
        end_batch(app, ADMIN, batch["id"])
