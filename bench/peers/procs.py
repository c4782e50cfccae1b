"""CPU and memory of process groups, from /proc: every process on a system's path counted.

A system under test is the process trees below some root pids (a peer's server, the Ray cluster a
child process started). :func:`snapshot` reads every process's CPU ticks, start time, RSS, parent
and command line; :func:`cpu_by_group` takes two snapshots and a classifier (command line → group
name, or ``None`` for "not this system's") and returns CPU seconds per group spent between them.
A pid counts only if it is the same process in both snapshots (same start time); a process born
between them counts from zero; one that died between them is lost (none does in a steady run).

Ray names its processes by role (``ray::ServeReplica:<app>:<deployment>``, ``ray::ProxyActor``,
``raylet``, ``gcs_server`` …): :func:`ray_group` folds them into the groups the report shows.

The parsing functions are pure (tests feed them text); only :func:`snapshot` and :func:`pss_kib`
read /proc.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # start time in ticks after boot: tells a reused pid apart
    ticks: int  # utime + stime, all threads
    rss_kib: int
    cmdline: str


def parse_stat(text: str) -> tuple[int, int, int, int]:
    """``/proc/PID/stat`` → (ppid, utime + stime ticks, start time ticks, RSS pages).

    The command name (field 2) may hold spaces and parentheses, so fields are counted from the last ')'.
    """
    fields = text.rsplit(")", 1)[1].split()
    # After the name: state(0) ppid(1) … utime(11) stime(12) … starttime(19) vsize(20) rss(21).
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21])


def snapshot(proc: Path = Path("/proc")) -> dict[int, Proc]:
    """Every process on the machine now."""
    found: dict[int, Proc] = {}
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):  # gone meanwhile, or a kernel thread
            ppid, ticks, start, rss = parse_stat((proc / entry / "stat").read_text())
            cmdline = (proc / entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            found[int(entry)] = Proc(int(entry), ppid, start, ticks, rss * PAGE_KIB, cmdline)
    return found


def threads(pid: int, proc: Path = Path("/proc")) -> dict[int, tuple[str, int]]:
    """The threads of ``pid`` now: thread id → (its name, utime + stime ticks)."""
    found: dict[int, tuple[str, int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir(proc / str(pid) / "task"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = (proc / str(pid) / "task" / entry / "stat").read_text()
                name = text[text.index("(") + 1:text.rindex(")")]
                found[int(entry)] = (name, parse_stat(text)[1])
    return found


def descendants(procs: dict[int, Proc], roots: Iterable[int], include_roots: bool = True) -> set[int]:
    """The pids below ``roots`` (and the roots themselves if ``include_roots``) in ``procs``."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    roots = [r for r in roots if r in procs]
    found = set(roots) if include_roots else set()
    stack = [c for r in roots for c in children.get(r, [])]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


Classifier = Callable[[str], "str | None"]


def cpu_by_group(before: dict[int, Proc], after: dict[int, Proc], pids: set[int],
                 classify: Classifier) -> dict[str, float]:
    """CPU seconds each group spent between the snapshots, over ``pids`` (taken in ``after``)."""
    spent: dict[str, float] = {}
    for pid in pids:
        now = after.get(pid)
        if now is None:
            continue
        group = classify(now.cmdline)
        if group is None:
            continue
        then = before.get(pid)
        base = then.ticks if then is not None and then.start == now.start else 0
        spent[group] = spent.get(group, 0.0) + (now.ticks - base) / TICKS_PER_S
    return spent


_REPLICA = re.compile(r"ServeReplica:([^: ]+):(\S+)")
_DEPLOYMENT_GROUPS = {"Gateway": "Gateway", "RateLimiter": "limiter", "TaskStore": "store",
                      "TaskRunner": "runner", "BatchService": "batches"}


def ray_group(cmdline: str, app: str | None = None) -> str | None:
    """A Ray process's group: ``Gateway``, ``worker``, ``limiter``, ``proxy``, ``Ray core`` ….

    With ``app``, the replicas of other Serve applications in the same cluster are not counted
    (``None``); Ray's shared processes (proxy, controller, raylet …) are, as they serve every app.
    """
    if match := _REPLICA.search(cmdline):
        if app is not None and match.group(1) != app:
            return None
        # Ray titles a replica process with the method it runs at the moment (``Gateway.check_health``).
        deployment = match.group(2).split(".", 1)[0]
        if deployment.startswith("worker-") or "Worker" in deployment:
            return "worker"
        return _DEPLOYMENT_GROUPS.get(deployment, deployment)
    if "ray::ProxyActor" in cmdline:
        return "Serve proxy"
    if "ray::ServeController" in cmdline:
        return "Serve controller"
    if "ray::IDLE" in cmdline or "default_worker.py" in cmdline:
        return "idle workers"
    first = cmdline.split(" ", 1)[0]
    if first.endswith(("/raylet", "/gcs_server")) or first in {"raylet", "gcs_server"}:
        return "Ray core"
    if "ray" in cmdline:  # dashboard, its agents, log monitor, runtime-env agent
        return "Ray dashboard and agents"
    return "other"


def everything(group: str) -> Classifier:
    """A classifier that puts every process in ``group`` (a peer's server, nginx's master and workers)."""
    return lambda _cmdline: group


def pss_kib(pid: int, proc: Path = Path("/proc")) -> int:
    """Proportional set size: pages shared between processes counted once over all of them."""
    with contextlib.suppress(OSError):
        for line in (proc / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def short_name(cmdline: str, width: int = 60) -> str:
    """A process's command line cut for a table: Ray's role names kept, long paths trimmed."""
    first, _, rest = cmdline.partition(" ")
    if first.startswith("ray::"):
        return first
    name = first.rsplit("/", 1)[-1]
    if name.startswith("python") and rest:
        script = rest.split(" ", 1)[0]
        name = f"{name} {script.rsplit('/', 1)[-1]}"
    return name[:width]
