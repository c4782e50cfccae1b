"""The examples of task files, run against a running cluster: `promptfleet tasks test`.

Each example's input goes through ``POST /v1/tasks/{name}/run`` (the task as active on the
cluster, or on another model with ``--model``); its expectations are checked here:

    valid      true: the run succeeded (its output is valid against output_schema); false: it failed
    equals     output field (dotted path, ``items.0.name``) → exact value
    matches    output field → regular expression its text must match (``re.search``)
    schema     a JSON Schema the output must satisfy as well
    judge      another model answers ``{"pass": bool, "reason": str}`` to a prompt that sees
               ``input`` and ``output`` (JSON text); it must pass

``evaluate`` is pure (tested without a cluster); ``run_examples`` does the HTTP.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from jsonschema import Draft202012Validator

from deployments.core.prompting import template_environment
from deployments.core.taskdefs import Example, Expectation, Judge, TaskDefinition

__all__ = ["Outcome", "evaluate", "field_value", "run_examples", "table"]

_MISSING = object()
JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"pass": {"type": "boolean"}, "reason": {"type": "string"}},
    "required": ["pass", "reason"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Outcome:
    task: str
    example: str
    passed: bool
    reason: str
    model: str | None = None
    version: int | None = None
    seconds: float = 0.0


def field_value(output: Any, path: str) -> Any:
    """``output`` at the dotted ``path`` (list items by index), or ``_MISSING``."""
    value = output
    for part in path.split(".") if path else []:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def evaluate(expect: Expectation, status: int, body: Any) -> list[str]:
    """Why the run's answer (HTTP ``status`` and JSON ``body``) misses ``expect`` (judge aside); [] if it does not."""
    succeeded = status == 200 and isinstance(body, dict) and "output" in body
    if not expect.valid:
        return [] if not succeeded else ["expected the run to fail, but it succeeded"]
    if not succeeded:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return [f"run failed: {status} {error.get('code') or ''}: {str(error.get('message') or body)[:200]}".strip()]
    output = body["output"]
    failures: list[str] = []
    for path, wanted in expect.equals.items():
        got = field_value(output, path)
        if got is _MISSING:
            failures.append(f"{path}: missing (expected {json.dumps(wanted)})")
        elif got != wanted:
            failures.append(f"{path}: {json.dumps(got)[:100]} != {json.dumps(wanted)[:100]}")
    for path, pattern in expect.matches.items():
        got = field_value(output, path)
        text = got if isinstance(got, str) else json.dumps(got) if got is not _MISSING else None
        if text is None:
            failures.append(f"{path}: missing (expected to match /{pattern}/)")
        elif re.search(pattern, text) is None:
            failures.append(f"{path}: {text[:100]!r} does not match /{pattern}/")
    if expect.json_schema is not None:
        for error in list(Draft202012Validator(expect.json_schema).iter_errors(output))[:3]:
            where = ".".join(str(p) for p in error.absolute_path) or "output"
            failures.append(f"schema: {where}: {error.message[:150]}")
    return failures


def _judge(client: httpx.Client, judge: Judge, task_input: dict[str, Any], output: Any) -> list[str]:
    try:
        prompt = template_environment().from_string(judge.prompt).render(
            input=task_input, output=json.dumps(output, ensure_ascii=False)
        )
    except Exception as exc:  # the template raised (1/0, a wrong type): the example fails, saying why
        return [f"judge: its prompt could not render: {type(exc).__name__}: {exc}"[:300]]
    body = {
        "model": judge.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "verdict", "schema": JUDGE_SCHEMA, "strict": True}},
    }
    response = client.post("/chat/completions", json=body)
    if response.status_code != 200:
        return [f"judge {judge.model}: {response.status_code}: {response.text[:200]}"]
    try:
        verdict = json.loads(response.json()["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        return [f"judge {judge.model}: no verdict in its answer"]
    if not isinstance(verdict, dict) or verdict.get("pass") is not True:
        reason = verdict.get("reason") if isinstance(verdict, dict) else verdict
        return [f"judge {judge.model}: fail: {str(reason)[:200]}"]
    return []


def run_example(client: httpx.Client, defn: TaskDefinition, example: Example, model: str | None) -> Outcome:
    started = time.monotonic()
    payload: dict[str, Any] = {"input": example.input, **({"model": model} if model else {})}
    try:
        response = client.post(f"/tasks/{defn.name}/run", json=payload, timeout=defn.timeout_s + 30)
        body = response.json()
        status = response.status_code
    except (httpx.HTTPError, ValueError) as exc:
        return Outcome(defn.name, example.name, False, f"no answer: {exc}"[:200], seconds=time.monotonic() - started)
    failures = evaluate(example.expect, status, body)
    if not failures and example.expect.judge is not None and example.expect.valid:
        failures = _judge(client, example.expect.judge, example.input, body["output"])
    answered = body if isinstance(body, dict) else {}
    return Outcome(
        defn.name, example.name, not failures, "; ".join(failures) or "ok",
        model=answered.get("model"), version=answered.get("task_version"), seconds=time.monotonic() - started,
    )


def run_examples(client: httpx.Client, defs: Iterable[TaskDefinition], model: str | None = None) -> list[Outcome]:
    return [run_example(client, defn, example, model) for defn in defs for example in defn.examples]


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as a text table, with the pass rate per task and overall."""
    rows = [("TASK", "EXAMPLE", "RESULT", "MODEL", "VERSION", "TIME", "REASON")]
    for o in outcomes:
        rows.append((o.task, o.example, "pass" if o.passed else "FAIL", o.model or "-",
                     str(o.version) if o.version is not None else "-", f"{o.seconds:.1f}s", o.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(cell.ljust(widths[i]) if i < 6 else cell for i, cell in enumerate(row)).rstrip()
             for row in rows]
    lines.append("")
    for task in dict.fromkeys(o.task for o in outcomes):
        mine = [o for o in outcomes if o.task == task]
        passed = sum(o.passed for o in mine)
        lines.append(f"{task}: {passed}/{len(mine)} passed ({100 * passed / len(mine):.0f}%)")
    passed = sum(o.passed for o in outcomes)
    total = len(outcomes)
    lines.append(f"total: {passed}/{total} passed ({100 * passed / total:.0f}%)" if total else "no examples")
    return "\n".join(lines)
