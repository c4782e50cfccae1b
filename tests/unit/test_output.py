"""Output parsing, validation messages and the repair loop."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Mapping
from typing import Any

import pytest

from deployments.core.output import OutputInvalid, RepairResult, parse_output, run_with_repair
from deployments.errors import TaskFailed, UpstreamError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "label": {"enum": ["bug", "feature"]},
        "reason": {"type": "string", "maxLength": 20},
    },
    "required": ["label", "reason"],
    "additionalProperties": False,
}
GOOD = {"label": "bug", "reason": "it crashes"}
GOOD_TEXT = '{"label": "bug", "reason": "it crashes"}'


@pytest.mark.parametrize(
    "text",
    [
        GOOD_TEXT,
        f"  \n{GOOD_TEXT}\n ",
        f"```json\n{GOOD_TEXT}\n```",
        f"```\n{GOOD_TEXT}\n```",
        f"Sure! Here it is:\n```json\n{GOOD_TEXT}\n```\nAnything else?",
        f"```json\n{GOOD_TEXT}",  # fence never closed (cut off)
        f"The answer is {GOOD_TEXT} as requested.",
        f"{GOOD_TEXT}\nHope this helps {{:",
        f"Labels [bug] and {{broken}} then {GOOD_TEXT}",
        # A first balanced value that does not validate is skipped for one that does.
        f'First {{"label": "maybe"}} then {GOOD_TEXT}',
    ],
)
def test_parse_accepts(text: str) -> None:
    assert parse_output(text, SCHEMA) == GOOD


def test_json_string_containing_fences_is_kept_whole() -> None:
    value = {"label": "bug", "reason": "```x```"}
    assert parse_output('{"label": "bug", "reason": "```x```"}', SCHEMA) == value


def test_arrays_are_extracted_too() -> None:
    assert parse_output("Result: [1, 2, 3].", {"type": "array", "items": {"type": "integer"}}) == [1, 2, 3]


def test_validation_messages_name_the_path() -> None:
    with pytest.raises(OutputInvalid) as info:
        parse_output('{"label": "maybe", "reason": "this reason is far too long", "x": 1}', SCHEMA)
    assert info.value.errors == [
        "$: Additional properties are not allowed ('x' was unexpected)",
        "$.label: 'maybe' is not one of ['bug', 'feature']",
        "$.reason: 'this reason is far too long' is too long",
    ]
    assert info.value.raw.startswith('{"label": "maybe"')


def test_first_candidate_errors_are_reported_when_none_validates() -> None:
    with pytest.raises(OutputInvalid) as info:
        parse_output('A {"label": "maybe", "reason": "r"} B {"label": "nope", "reason": "r"}', SCHEMA)
    assert info.value.errors == ["$.label: 'maybe' is not one of ['bug', 'feature']"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "$: output is empty"),
        ("   ", "$: output is empty"),
        ("I cannot help with that.", "$: no JSON value found in the output"),
        ('{"label": "bug", "reason": "cut of', "$: no JSON value found in the output"),
        ('{"label": NaN}', "$: no JSON value found in the output"),
        ("[" * 5000, "$: no JSON value found in the output"),
    ],
)
def test_no_json(text: str, error: str) -> None:
    with pytest.raises(OutputInvalid) as info:
        parse_output(text, SCHEMA)
    assert info.value.errors == [error]


def test_many_errors_are_capped_and_long_ones_truncated() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    with pytest.raises(OutputInvalid) as info:
        parse_output(str(["x" * 1000] * 30).replace("'", '"'), schema)
    assert len(info.value.errors) == 11
    assert info.value.errors[-1] == "… and 20 more errors"
    assert all(len(e) <= 300 for e in info.value.errors)


def test_output_invalid_pickles() -> None:
    exc = OutputInvalid("raw text", ["$: bad"])
    copy = pickle.loads(pickle.dumps(exc))
    assert (copy.raw, copy.errors, str(copy)) == ("raw text", ["$: bad"], "$: bad")


class ScriptedModel:
    """A fake ``call`` that returns the scripted replies in order and records what it saw."""

    def __init__(self, *replies: str | Exception) -> None:
        self.replies = list(replies)
        self.seen: list[list[dict[str, str]]] = []

    async def __call__(self, messages: list[dict[str, str]]) -> tuple[str, Mapping[str, Any]]:
        self.seen.append([dict(m) for m in messages])
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply, {"prompt_tokens": 10 * len(messages), "completion_tokens": 5, "total_tokens": None}


MESSAGES = [{"role": "system", "content": "sys"}, {"role": "user", "content": "classify"}]


def test_first_valid_reply_wins() -> None:
    model = ScriptedModel(GOOD_TEXT)
    result = asyncio.run(run_with_repair(model, MESSAGES, SCHEMA, max_attempts=3))
    assert result == RepairResult(
        output=GOOD,
        attempts=1,
        usage={"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
        raw=GOOD_TEXT,
    )


def test_repair_feeds_back_errors_and_sums_usage() -> None:
    bad = '{"label": "maybe", "reason": "unsure"}'
    model = ScriptedModel(bad, f"```json\n{GOOD_TEXT}\n```")
    result = asyncio.run(run_with_repair(model, MESSAGES, SCHEMA, max_attempts=3))
    assert result.output == GOOD
    assert result.attempts == 2
    assert result.usage == {"prompt_tokens": 20 + 40, "completion_tokens": 10, "total_tokens": 70}
    second = model.seen[1]
    assert second[:2] == MESSAGES
    assert second[2] == {"role": "assistant", "content": bad}
    assert second[3]["role"] == "user"
    assert "$.label: 'maybe' is not one of ['bug', 'feature']" in second[3]["content"]
    assert "JSON only" in second[3]["content"] or "corrected JSON" in second[3]["content"]
    assert MESSAGES == [{"role": "system", "content": "sys"}, {"role": "user", "content": "classify"}]


def test_exhaustion_raises_task_failed_with_details() -> None:
    model = ScriptedModel("no", '{"label": "maybe"}', "x" * 5000 + ' {"label": "nope", "reason": "r"}')
    with pytest.raises(TaskFailed) as info:
        asyncio.run(run_with_repair(model, MESSAGES, SCHEMA, max_attempts=3))
    exc = info.value
    assert exc.status_code == 422
    assert "after 3 attempts" in exc.message
    assert exc.details is not None
    assert exc.details["attempts"] == 3
    assert exc.details["validation_errors"] == ["$.label: 'nope' is not one of ['bug', 'feature']"]
    assert len(exc.details["raw_output"]) == 4000
    assert len(model.seen) == 3
    assert len(model.seen[2]) == 2 + 2 * 2  # two failed turns fed back
    body = pickle.loads(pickle.dumps(exc)).to_body()["error"]
    assert body["code"] == "task_failed" and body["attempts"] == 3


def test_single_attempt_does_not_repair() -> None:
    model = ScriptedModel("nope")
    with pytest.raises(TaskFailed, match="after 1 attempt:"):
        asyncio.run(run_with_repair(model, MESSAGES, SCHEMA, max_attempts=1))
    assert len(model.seen) == 1


def test_call_errors_propagate_unchanged() -> None:
    boom = UpstreamError("upstream said no")
    model = ScriptedModel("not json", boom)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(run_with_repair(model, MESSAGES, SCHEMA, max_attempts=3))
    assert info.value is boom


def test_max_attempts_must_be_positive() -> None:
    with pytest.raises(ValueError):
        asyncio.run(run_with_repair(ScriptedModel(), MESSAGES, SCHEMA, max_attempts=0))
