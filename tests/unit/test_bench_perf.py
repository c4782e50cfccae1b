"""bench.peers.perf: reading `perf script` lines, folding samples per group and symbol, what grew."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers import perf


@pytest.mark.parametrize(("line", "expected"), [
    ("          python 24486 ffffffff82239e46 copy_mc_enhanced_fast_string ([kernel.kallsyms])",
     ("python", 24486, "copy_mc_enhanced_fast_string", "[kernel.kallsyms]")),
    # A thread's name may hold spaces; a symbol perf could not name is "[unknown]".
    ("  Dashboard Head  3101 7f12ab [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)",
     ("Dashboard Head", 3101, "[unknown]", "/usr/lib/x86_64-linux-gnu/libc.so.6")),
    ("ray::ServeRepli   812 55d0c1 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
     ("ray::ServeRepli", 812, "_PyEval_EvalFrameDefault", "/usr/lib/libpython3.11.so.1.0")),
])
def test_a_sample_line_gives_its_process_symbol_and_dso(line: str, expected: tuple[str, int, str, str]) -> None:
    match = perf.SAMPLE_LINE.match(line)
    assert match is not None
    assert (match["comm"], int(match["pid"]), match["symbol"], match["dso"]) == expected


def test_code_is_sorted_into_kernel_interpreter_libc_or_its_extension() -> None:
    assert perf.dso_kind("[kernel.kallsyms]") == "kernel"
    assert perf.dso_kind("/usr/lib/libpython3.11.so.1.0") == "python"
    assert perf.dso_kind("/usr/bin/python3.11") == "python"
    assert perf.dso_kind("/lib/x86_64-linux-gnu/libc.so.6") == "libc"
    assert perf.dso_kind("/v/site-packages/pydantic_core/_pydantic_core.cpython-311-x86_64-linux-gnu.so") \
        == "_pydantic_core"
    assert perf.dso_kind("/v/site-packages/ray/_raylet.so") == "_raylet"


def test_samples_become_microseconds_per_request_by_group_and_symbol(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = [("python", 10, "tcp_sendmsg", "[kernel.kallsyms]")] * 3 + [
        ("python", 10, "_PyEval_EvalFrameDefault", "/usr/lib/libpython3.11.so.1.0"),
        ("wrk", 20, "epoll_wait", "[kernel.kallsyms]"),
        ("swapper", perf.IDLE_PID, "pv_native_safe_halt", "[kernel.kallsyms]"),  # an idle CPU: not anyone's cost
        ("sleep", 30, "exit", "[kernel.kallsyms]"),  # a process the classifier leaves out
    ]

    def fake_samples(_data: Path) -> Iterator[tuple[str, int, str, str]]:
        yield from recorded

    monkeypatch.setattr(perf, "samples", fake_samples)
    groups = {10: "Gateway", 20: "wrk"}
    result = perf.attribute(Path("unused"), lambda _comm, pid: groups.get(pid), requests=2)
    us = 1e6 / perf.FREQUENCY_HZ / 2  # one sample's µs, spread over two requests
    assert result["us_per_request"] == {"Gateway": round(4 * us, 2), "wrk": round(us, 2)}
    assert result["by_kind"]["Gateway"] == {"kernel": round(3 * us, 2), "python": round(us, 2)}
    assert result["top"][0] == ["Gateway", "tcp_sendmsg [kernel]", round(3 * us, 2)]


def test_growth_lists_what_cost_more_per_request_at_the_higher_level_first() -> None:
    low = {"top": [["Gateway", "a", 10.0], ["Gateway", "b", 5.0]]}
    high = {"top": [["Gateway", "a", 11.0], ["Gateway", "b", 9.0], ["upstream", "c", 2.0]]}
    assert perf.growth(low, high) == [("Gateway", "b", 5.0, 9.0), ("upstream", "c", 0.0, 2.0),
                                      ("Gateway", "a", 10.0, 11.0)]
