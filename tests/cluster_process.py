"""A private promptfleet cluster owned by a child process, for tests that stop a whole cluster.

Ray allows one cluster per driver process and the session's cluster (tests.fixtures) lives in
the pytest process, so a test that must stop and start an entire cluster runs it in a child:

    with ClusterProcess(config, log) as cluster:   # python -m tests.cluster_process CONFIG.json
        ...                                        # the app is RUNNING; cluster.dashboard
        cluster.kill()                             # the whole cluster dies at once
        cluster.start()                            # a new one: same config, ports and state_dir
    # leaving the block kills it too

``kill()`` SIGKILLs the child, the driver that started Ray: its GCS and raylet die with it
(Ray starts them fate-sharing with the driver), and the replicas with the raylet — no Serve
drain, no lease released, like a crashed head node. Every process of the tree is then waited
for, by pid, so the next cluster starts on a quiet machine and finds its ports free.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> set[int]:
    """Live (non-zombie) processes below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(") ", 1)[1].split()
            if fields[0] != "Z":
                parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    return False


class ClusterProcess:
    """Runs ``config`` on a Ray cluster of its own, in a child process; see the module docstring."""

    def __init__(self, config: dict[str, Any], log: Path) -> None:
        """``log`` receives the child's output (Ray's start-up messages); the config goes next to it."""
        self.config = config
        self.log = log
        self.dashboard = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[str] | None = None
        self._config_file = log.with_suffix(".json")
        self._config_file.write_text(json.dumps(config))

    def start(self, timeout_s: float = 300) -> None:
        """Start the cluster and return once every application is RUNNING."""
        assert self._proc is None, "already running"
        self._log = self.log.open("a")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.cluster_process", str(self._config_file)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        # The child prints one JSON line once every application is RUNNING.
        fd, buffer = self._proc.stdout.fileno(), b""
        while b"\n" not in buffer:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the cluster did not come up; see {self.log}")
            if select.select([fd], [], [], 0.5)[0]:
                buffer += os.read(fd, 65536)
        self.dashboard = json.loads(buffer.splitlines()[0])["dashboard"]

    def kill(self, timeout_s: float = 3) -> None:
        """Kill the whole cluster at once and wait until every one of its processes is gone.

        Ray's DashboardAgent and RuntimeEnvAgent outlive their raylet (seen: > 30 s); after
        ``timeout_s`` whatever is left of the tree gets SIGKILL, as ``ray stop --force`` would.
        """
        if self._proc is None:
            return
        tree = descendants(self._proc.pid)
        self._proc.kill()
        self._proc.wait()
        self._reap(tree, timeout_s)

    def _reap(self, tree: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for pid in tree:
            while alive(pid):
                if time.monotonic() > deadline:  # outlived its parents: ours, ended by pid
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.1)
        self._close()

    def _close(self) -> None:
        if self._proc is not None:
            for stream in (self._proc.stdin, self._proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self._log is not None:
            self._log.close()
        self._proc, self._log = None, None

    def __enter__(self) -> ClusterProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()  # the cluster is disposable: no graceful shutdown needed


def main(argv: list[str] | None = None) -> int:
    """The child: start Ray + deploy, print ``{"dashboard": …}``, run until stdin closes.

    Stdin closes when the parent dies without killing us: then Serve and Ray shut down in order.
    """
    import ray
    from ray import serve

    from tests.fixtures import start_cluster

    (config_path,) = sys.argv[1:] if argv is None else argv
    dashboard = start_cluster(json.loads(Path(config_path).read_text()))
    print(json.dumps({"dashboard": dashboard}), flush=True)
    sys.stdin.read()
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
