"""wrk as the load generator: its Lua script for a chat request, its command line, its report parsed.

wrk (Debian package ``wrk``) is event-driven C: one thread drives hundreds of keep-alive
connections for a few per cent of a core, so the systems under test keep the machine's cores.
It sends the same POST again and again, closed-loop: each connection sends its next request as
soon as the answer to the previous one is in. ``--latency`` makes it print the percentiles;
non-2xx answers and socket errors are counted apart, so a peer that fails fast cannot look fast.

Pure except :func:`run`: tests feed :func:`parse` recorded output.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")


@dataclass
class WrkResult:
    """What one wrk run measured (latencies in ms; ``None`` when wrk printed none)."""

    requests: int  # every answer read, any status
    seconds: float  # wrk's own measured run time
    rps: float  # wrk's "Requests/sec": every answer, any status
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, timeout
    latency_ms: dict[str, float] = field(default_factory=dict)  # "50", "75", "90", "99"

    @property
    def ok(self) -> int:
        """Answers with a 2xx/3xx status (timeouts never got an answer, so are not in ``requests``)."""
        return max(0, self.requests - self.non_2xx)

    @property
    def ok_rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "ok_rps": round(self.ok_rps, 1)}


def duration_ms(text: str) -> float:
    """``"1.23ms"`` → 1.23; ``"812.00us"`` → 0.812; ``"1.02s"`` → 1020.0 (wrk's own units)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse(output: str) -> WrkResult:
    """wrk's report (run with ``--latency``) → :class:`WrkResult`. ValueError if it holds no totals."""
    totals = re.search(r"^\s*(\d+) requests in ([\d.]+\w+),", output, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not totals or not rate:
        raise ValueError("wrk printed no totals (did it run?):\n" + output[-2000:])
    result = WrkResult(requests=int(totals.group(1)), seconds=duration_ms(totals.group(2)) / 1000,
                       rps=float(rate.group(1)))
    if non_2xx := re.search(r"^\s*Non-2xx or 3xx responses:\s+(\d+)", output, re.M):
        result.non_2xx = int(non_2xx.group(1))
    if socket := re.search(r"^\s*Socket errors:(.*)$", output, re.M):
        result.socket_errors = {name: int(n) for name, n in re.findall(r"(\w+) (\d+)", socket.group(1)) if int(n)}
    distribution = output.split("Latency Distribution", 1)
    if len(distribution) == 2:
        for percent, value in re.findall(r"^\s*(\d+)%\s+(\S+)", distribution[1], re.M):
            result.latency_ms[percent] = round(duration_ms(value), 3)
    return result


def lua_script(body: dict[str, Any], headers: dict[str, str]) -> str:
    """The Lua that makes wrk POST ``body`` as JSON with ``headers`` on every request."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(json.dumps(body))}",
             'wrk.headers["Content-Type"] = "application/json"']
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    return "\n".join(lines) + "\n"


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# A closed loop completes at most ceil(D / L) - 1 answers per connection in a window of D seconds when
# every answer takes a little longer than the upstream's L (and every system adds something): with a
# 500 ms upstream a 4 s window holds 7 rounds of the 8 an ideal one would, 87.5 % of ideal for any
# system however fast, and 8 s holds 15 of 16 (93.75 %). At 40 rounds the cap is 97.5 %.
SLOW_ROUNDS = 40.0


def cell_seconds(duration_s: float, latency_ms: float, rounds: float = SLOW_ROUNDS) -> float:
    """A cell's window: ``duration_s``, or longer where the upstream's latency makes that few rounds."""
    return max(duration_s, rounds * latency_ms / 1000)


def round_cap(seconds: float, latency_ms: float) -> float | None:
    """The share of ideal req/s a closed loop can reach in ``seconds`` when every answer takes a little
    longer than ``latency_ms``; None with no upstream latency (no rounds to count) or no window."""
    if latency_ms <= 0 or seconds <= 0:
        return None
    rounds = seconds * 1000 / latency_ms
    return (math.ceil(rounds) - 1) / rounds


def command(wrk: Path, url: str, script: Path, connections: int, seconds: float, timeout_s: float = 30) -> list[str]:
    """One thread (it is enough, and leaves the cores to the systems under test). wrk takes whole seconds."""
    return [str(wrk), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            f"--timeout={max(1, round(timeout_s))}s", "--latency", "-s", str(script), url]


def run(argv: list[str], env: dict[str, str] | None = None) -> WrkResult:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout[-500:]}")
    return parse(done.stdout)
