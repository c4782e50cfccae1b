"""The Ray nodes promptfleet started on this machine, and stopping exactly those.

``ray stop`` ends every Ray process of the user on the machine — another checkout's cluster, a
colleague's notebook session. ``promptfleet start`` and ``promptfleet join`` instead give each node
they start a mark of its own, an environment variable (``PROMPTFLEET_NODE``) that every process Ray
starts for the node inherits, and write a record of the node:

    $PROMPTFLEET_STATE_DIR/nodes/<mark>.json   (default ~/.promptfleet/nodes/)
    {"mark", "role": "head"|"worker", "dashboard", "gcs_address", "temp_dir", "session_dir",
     "processes": {pid: start time in clock ticks}}

``promptfleet stop --ray`` stops the nodes recorded for one cluster (the head's dashboard URL, or
the GCS address a worker joined): it finds their processes — those carrying the mark, their
descendants (a Ray worker rewrites its process title, which can hide its environment, but it is
the raylet's child), and the recorded pids that are still the same processes (same start time:
a pid the system reused for something else is left alone) — sends SIGTERM, and SIGKILL to what is
left after a timeout. Processes of any other cluster carry no such mark and are never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

MARK_ENV = "PROMPTFLEET_NODE"
STATE_DIR_ENV = "PROMPTFLEET_STATE_DIR"
DEFAULT_RAY_TEMP_DIR = "/tmp/ray"


@dataclass
class NodeRecord:
    """One node started by ``promptfleet start``/``join`` on this machine."""

    mark: str
    role: str  # "head" | "worker"
    dashboard: str | None  # the head's dashboard URL (heads only)
    gcs_address: str  # the cluster's GCS address, HOST:PORT
    temp_dir: str
    session_dir: str | None = None
    processes: dict[int, int] = field(default_factory=dict)  # pid -> start time (clock ticks after boot)


def new_mark() -> str:
    return uuid.uuid4().hex


def state_dir(environ: Mapping[str, str]) -> Path:
    return Path(environ.get(STATE_DIR_ENV) or "~/.promptfleet").expanduser() / "nodes"


def ray_temp_dir(ray_args: Iterable[str]) -> str:
    """The node's Ray temp dir: ``--temp-dir`` among the `ray start` options, else Ray's default."""
    args = list(ray_args)
    for i, arg in enumerate(args):
        if arg == "--temp-dir" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--temp-dir="):
            return arg.split("=", 1)[1]
    return DEFAULT_RAY_TEMP_DIR


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields is not None and fields[0] != "Z" else None


def alive(pid: int) -> bool:
    return start_time(pid) is not None


def marked(mark: str, name: str = MARK_ENV) -> set[int]:
    """Live processes whose environment holds ``name=mark`` (only the user's own are readable)."""
    needle = f"{name}={mark}".encode() + b"\0"
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if needle in environ.read_bytes():
                found.add(int(environ.parent.name))
    return {pid for pid in found if alive(pid)}


def descendants(roots: set[int]) -> set[int]:
    """Live processes below ``roots``."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _proc_stat(int(stat.parent.name))
        if fields is not None and fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = set(roots)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def node_processes(record: NodeRecord) -> set[int]:
    """The node's live processes: marked, their descendants, and recorded pids still the same process."""
    still = {pid for pid, started in record.processes.items() if start_time(pid) == started}
    roots = marked(record.mark) | still
    return (roots | descendants(roots)) - {os.getpid()}


def session_dir(temp_dir: str) -> str | None:
    """The session directory `ray start` just made in ``temp_dir`` (its ``session_latest``)."""
    latest = Path(temp_dir) / "session_latest"
    return str(latest.resolve()) if latest.exists() else None


def save(record: NodeRecord, environ: Mapping[str, str]) -> Path:
    record.processes = {pid: started for pid in sorted(node_processes(record))
                        if (started := start_time(pid)) is not None}
    directory = state_dir(environ)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.mark}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1))
    tmp.replace(path)
    return path


def forget(record: NodeRecord, environ: Mapping[str, str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        (state_dir(environ) / f"{record.mark}.json").unlink()


def records(environ: Mapping[str, str]) -> list[NodeRecord]:
    found = []
    for path in sorted(state_dir(environ).glob("*.json")):
        try:
            raw = json.loads(path.read_text())
            raw["processes"] = {int(pid): int(t) for pid, t in (raw.get("processes") or {}).items()}
            found.append(NodeRecord(**raw))
        except (OSError, ValueError, TypeError):
            continue  # a record being written, or one of another version: not ours to act on
    return found


def of_cluster(all_records: list[NodeRecord], dashboard: str | None, gcs_address: str | None) -> list[NodeRecord]:
    """The nodes of one cluster: the head whose dashboard is ``dashboard`` and every node on its GCS,
    or every node on ``gcs_address``."""
    addresses = {gcs_address} if gcs_address else set()
    if dashboard:
        addresses |= {r.gcs_address for r in all_records if r.role == "head" and r.dashboard == dashboard.rstrip("/")}
    return [r for r in all_records if r.gcs_address in addresses]


def terminate(pids: set[int], timeout_s: float) -> tuple[int, int]:
    """SIGTERM ``pids``; SIGKILL those alive after ``timeout_s``. Returns (terminated, killed)."""
    pids = {pid for pid in pids if alive(pid)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.2)
    left = {pid for pid in pids if alive(pid)}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # A killed process is not gone the instant the signal is sent: wait for it, or a second look
    # (stop_nodes' stragglers) finds it still running and counts it again.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(alive(pid) for pid in left):
        time.sleep(0.02)
    return len(pids) - len(left), len(left)


# Stopped last, with a short grace: told to stop, Ray 2.60's GCS logs "Stopping GCS server" and
# can then hang flushing events to agents already gone (the autoscaler monitor waits on it), which
# made every stop wait its whole timeout. The GCS keeps nothing promptfleet needs (no Redis).
LAST = (b"gcs_server", b"autoscaler/_private/monitor.py")
LAST_GRACE_S = 5.0


def stops_last(pid: int) -> bool:
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return any(needle in cmdline for needle in LAST)
    return False


def stop_nodes(nodes: list[NodeRecord], environ: Mapping[str, str], timeout_s: float) -> tuple[int, int]:
    """Stop every process of ``nodes`` (gathered before the first signal: a raylet that dies first
    must not hide its workers), the GCS and the autoscaler monitor after the rest, and forget the
    records. Returns (terminated, killed)."""
    pids: set[int] = set()
    for node in nodes:
        pids |= node_processes(node)
    last = {pid for pid in pids if stops_last(pid)}
    first = terminate(pids - last, timeout_s)
    then = terminate(last, min(timeout_s, LAST_GRACE_S))
    counts = first[0] + then[0], first[1] + then[1]
    # Processes a dying node still spawned (a worker started during shutdown) carry the mark too.
    stragglers = set().union(*(node_processes(node) for node in nodes)) if nodes else set()
    late = terminate(stragglers, min(timeout_s, 5.0)) if stragglers else (0, 0)
    for node in nodes:
        forget(node, environ)
    return counts[0] + late[0], counts[1] + late[1]
