"""`promptfleet stop --ray` stops the processes of the nodes promptfleet started, and nothing else.

The "nodes" here are ordinary processes started the way `ray start` starts a node's processes
(the mark in their environment, children below them); the real thing, two Ray clusters of which
one is stopped, is tests/cluster/test_stop.py.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster import cli, ownership

# A parent that starts a child which ignores SIGTERM (a process slow to stop), then waits.
TREE = (
    "import signal, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(600)'])\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        for pid in ownership.descendants({proc.pid}) | {proc.pid}:
            if ownership.alive(pid):
                os.kill(pid, 9)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def start(procs: list[subprocess.Popen[bytes]], mark: str | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, **({ownership.MARK_ENV: mark} if mark else {})}
    env.pop(ownership.MARK_ENV, None) if mark is None else None
    # The child prints a line once its SIGTERM handler is in place (it shares the parent's stdout).
    proc = subprocess.Popen([sys.executable, "-c", TREE], env=env, start_new_session=True,
                            stdout=subprocess.PIPE)
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready and proc.stdout.readline() == b"1\n", "the child did not start"
    return proc


def head_node(state: Path) -> tuple[dict[str, str], ownership.NodeRecord]:
    """The environment of a `promptfleet` whose records live in ``state``, and a new head's record."""
    return {ownership.STATE_DIR_ENV: str(state)}, ownership.NodeRecord(
        mark=ownership.new_mark(), role="head", dashboard="http://127.0.0.1:9", gcs_address="127.0.0.9:1",
        temp_dir=str(state))


def tree(proc: subprocess.Popen[bytes]) -> set[int]:
    return {pid for pid in ownership.descendants({proc.pid}) | {proc.pid} if ownership.alive(pid)}


def test_stop_ends_the_marked_node_and_its_stubborn_child_and_leaves_another_cluster(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    environ, mine = head_node(tmp_path)
    ours = start(spawned, mine.mark)
    other = start(spawned, None)  # another Ray cluster of the same user: no mark of ours
    ownership.save(mine, environ)
    assert tree(ours) <= set(ownership.records(environ)[0].processes)
    assert len(tree(ours)) == 2

    nodes = ownership.of_cluster(ownership.records(environ), "http://127.0.0.1:9/", None)
    assert [n.mark for n in nodes] == [mine.mark]
    terminated, killed = ownership.stop_nodes(nodes, environ, timeout_s=1.0)
    assert (terminated, killed) == (1, 1)  # the parent on SIGTERM, the child that ignores it by SIGKILL
    assert ours.wait(timeout=5) is not None and not tree(ours)
    assert len(tree(other)) == 2 and other.poll() is None
    assert ownership.records(environ) == []  # the record went with the node


# Stands in for Ray's GCS (its file is named gcs_server): on SIGTERM it writes whether the node's
# other process was still alive, then stays, as the real one can while flushing to agents gone.
LAST_ONE = (
    "import signal, sys, time\n"
    "from cluster import ownership\n"
    "other, out = int(sys.argv[1]), sys.argv[2]\n"
    "def on_term(*_):\n"
    "    open(out, 'w').write('other alive' if ownership.alive(other) else 'other gone')\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print(1, flush=True)\n"
    "while True: time.sleep(1)\n"
)


def test_the_gcs_is_told_to_stop_after_the_rest_of_its_node_and_killed_soon_after(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    environ, node = head_node(tmp_path)
    other = start(spawned, node.mark)  # a parent and its SIGTERM-ignoring child
    gcs, said = tmp_path / "gcs_server", tmp_path / "said"
    gcs.write_text(LAST_ONE)
    env = {**os.environ, ownership.MARK_ENV: node.mark, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    last = subprocess.Popen([sys.executable, str(gcs), str(other.pid), str(said)], env=env,
                            start_new_session=True, stdout=subprocess.PIPE)
    spawned.append(last)
    assert last.stdout is not None and last.stdout.readline() == b"1\n"
    ownership.save(node, environ)

    terminated, killed = ownership.stop_nodes([node], environ, timeout_s=1.0)
    assert said.read_text() == "other gone"  # told to stop only once the rest had ended
    assert (terminated, killed) == (1, 2)  # the parent on SIGTERM; the stubborn child and the GCS by SIGKILL
    assert last.wait(timeout=5) is not None and other.wait(timeout=5) is not None


def test_a_recorded_pid_reused_by_another_process_is_left_alone(
    spawned: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    other = start(spawned, None)
    started = ownership.start_time(other.pid)
    assert started is not None
    stale = ownership.NodeRecord(mark=ownership.new_mark(), role="worker", dashboard=None, gcs_address="h:1",
                                 temp_dir=str(tmp_path), processes={other.pid: started - 1})
    assert ownership.node_processes(stale) == set()
    assert ownership.node_processes(
        ownership.NodeRecord(**{**stale.__dict__, "processes": {other.pid: started}})) == tree(other)


def test_workers_are_found_by_the_gcs_address_they_joined(tmp_path: Path) -> None:
    head = ownership.NodeRecord(mark="a", role="head", dashboard="http://127.0.0.1:8265", gcs_address="10.0.0.1:6379",
                                temp_dir="/t")
    worker = ownership.NodeRecord(mark="b", role="worker", dashboard=None, gcs_address="10.0.0.1:6379", temp_dir="/t")
    stranger = ownership.NodeRecord(mark="c", role="head", dashboard="http://127.0.0.1:9", gcs_address="10.0.0.2:1",
                                    temp_dir="/t")
    everything = [head, worker, stranger]
    assert ownership.of_cluster(everything, "http://127.0.0.1:8265", None) == [head, worker]
    assert ownership.of_cluster(everything, None, "10.0.0.1:6379") == [head, worker]
    assert ownership.of_cluster(everything, "http://127.0.0.1:1", None) == []
    assert ownership.ray_temp_dir(["--port", "1", "--temp-dir", "/x"]) == "/x"
    assert ownership.ray_temp_dir(["--temp-dir=/y"]) == "/y"
    assert ownership.ray_temp_dir([]) == ownership.DEFAULT_RAY_TEMP_DIR


def test_stop_ray_without_a_record_stops_nothing_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ownership.STATE_DIR_ENV, str(tmp_path))
    assert cli.main(["stop", "--ray", "--dashboard", "http://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "nothing stopped" in err and "ray stop" in err
