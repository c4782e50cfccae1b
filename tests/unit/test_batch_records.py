"""Batch and file records in the run store's database, and the JSON records of earlier releases.

``tests/schema_history/batch-records-2026-12-07/`` is the directory the BatchStore of the release
before this one left (made by that release's own code): two uploads, a completed batch with its
output and error files, a batch still running. Opening it imports every record into the database
once, on SQLite and PostgreSQL, and nothing of it is lost.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from deployments.config import QuotasConfig
from deployments.errors import NotFound
from deployments.store import RunStore, open_database
from deployments.store.batches import BatchRecord, BatchStore, FileRecord

LEGACY = Path(__file__).resolve().parents[1] / "schema_history" / "batch-records-2026-12-07"
DONE, RUNNING = "batch_ddb6f34a26885d6b2ec512c2", "batch_01c496741b64c2137645c04c"
ALICE, BOB = "key_00000000000000a1", "key_00000000000000b2"


def legacy_copy(tmp_path: Path) -> Path:
    root = tmp_path / "state" / "batches"
    shutil.copytree(LEGACY, root)
    return root


def json_records(root: Path) -> dict[str, dict[str, object]]:
    paths = [*(root / "files").glob("*.json"), *(root / "batches").glob("*.json")]
    return {path.stem: json.loads(path.read_text()) for path in paths}


def test_json_records_of_the_release_before_are_imported_once(
    tmp_path: Path, fresh_location: Callable[[], str]
) -> None:
    root = legacy_copy(tmp_path)
    before = json_records(root)
    assert len(before) == 6  # 4 files (2 uploads, an output, an error file) and 2 batches
    location = fresh_location()
    with BatchStore(root, database=location) as store:
        assert not json_records(root)  # imported, then removed
        files, batches = store.files, store.batches
        assert {i: FileRecord(**r) for i, r in before.items() if i.startswith("file-")} == files  # type: ignore[arg-type]
        assert {i: BatchRecord(**r) for i, r in before.items() if i.startswith("batch_")} == batches  # type: ignore[arg-type]
        done = store.get_batch(ALICE, DONE)
        assert done.metadata == {"team": "search"} and done.tokens["total_tokens"] == 12
        assert done.output_file_id is not None and done.error_file_id is not None
        assert store.read_file(ALICE, done.output_file_id, 0, 100) == b'{"id":"1"}\n{"id":"2"}\n'
        assert store.read_file(BOB, store.get_batch(BOB, RUNNING).input_file_id, 0, 100) == b'{"custom_id":"x"}\n'
        with pytest.raises(NotFound):
            store.get_batch(BOB, DONE)  # still owner-scoped
        assert [b.id for b in store.all_unfinished()] == [RUNNING]
        assert store.stored(ALICE) == (3, files[done.input_file_id].bytes + 22 + 11)
    with BatchStore(root, database=location) as store:  # the next start: nothing left to import
        assert store.import_json_records() == 0 and store.batches == batches and store.files == files
    # The records are in the database the runs are in: one backup holds both.
    database = open_database(location)
    try:
        RunStore(database)
        with database.autocommit() as tx:
            assert tx.one("SELECT COUNT(*) AS n FROM batches")["n"] == 2  # type: ignore[index]
    finally:
        database.close()


def test_an_import_repeated_after_a_crash_keeps_what_the_database_holds(
    tmp_path: Path, fresh_location: Callable[[], str]
) -> None:
    root = legacy_copy(tmp_path)
    location = fresh_location()
    with BatchStore(root, database=location) as store:
        running = store.get_batch(BOB, RUNNING)
        running.status, running.cancelling_at = "cancelling", 1764900400
        store.save_batch(running)
    # As if the process died after the import committed and before the JSON files were removed.
    shutil.copy(LEGACY / "batches" / f"{RUNNING}.json", root / "batches")
    with BatchStore(root, database=location) as store:
        assert store.get_batch(BOB, RUNNING).status == "cancelling"
        assert not json_records(root)


def test_files_and_batches_page_newest_first_in_sql(tmp_path: Path, fresh_location: Callable[[], str]) -> None:
    with BatchStore(tmp_path, quotas=QuotasConfig(max_batches_per_key=5), database=fresh_location()) as store:
        ids = []
        for n in range(4):
            upload_id = store.begin_upload("alice", f"{n}.jsonl")
            store.write_upload(upload_id, b"{}\n")
            ids.append(store.finish_upload(upload_id, now=100 + n // 2).id)  # two share each second
        expected = sorted(ids, key=lambda i: (-(100 + ids.index(i) // 2), i))
        page, more = store.list_files("alice", None, 3, None)
        assert [f.id for f in page] == expected[:3] and more
        page, more = store.list_files("alice", "batch", 3, page[-1].id)
        assert [f.id for f in page] == expected[3:] and not more
        assert store.list_files("alice", "batch_output", 3, None) == ([], False)
        assert store.list_files("alice", None, 3, "file-unknown") == ([], False)
        assert store.list_files("bob", None, 3, None) == ([], False)
