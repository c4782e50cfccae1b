"""Prompt rendering, input validation and the provider response_format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.core.prompting import render_messages, response_format_for, validate_input
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import load_task_definitions
from deployments.errors import InvalidRequest, TemplateFailed

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 50},
        "lang": {"type": "string"},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
        "email": {"type": "string", "format": "email"},
    },
    "required": ["text"],
    "additionalProperties": False,
}


def task(**changes: Any) -> TaskDefinition:
    data: dict[str, Any] = {
        "name": "demo",
        "description": "Demo.",
        "model": "smollm2",
        "input_schema": INPUT_SCHEMA,
        "output_schema": {"type": "object"},
        "system": "You answer in {{ lang | default('English') }}.",
        "prompt": "Text: {{ text }}",
        **changes,
    }
    return TaskDefinition.model_validate(data)


def test_render_system_and_user() -> None:
    messages = render_messages(task(), {"text": "<b>hi</b>\n", "lang": "German"})
    assert messages == [
        {"role": "system", "content": "You answer in German."},
        # autoescape is off: prompts are text, not HTML; the trailing newline of a value stays.
        {"role": "user", "content": "Text: <b>hi</b>\n"},
    ]


def test_render_without_system() -> None:
    assert render_messages(task(system=None), {"text": "x"}) == [{"role": "user", "content": "Text: x"}]


def test_template_trailing_newline_is_dropped() -> None:
    assert render_messages(task(system=None, prompt="{{ text }}\n"), {"text": "x"})[0]["content"] == "x"


def test_missing_variable_is_invalid_request_naming_it() -> None:
    with pytest.raises(InvalidRequest) as info:
        render_messages(task(), {"lang": "French"})
    assert info.value.param == "input.text"
    assert "'text'" in info.value.message


def test_is_defined_guard_works_with_strict_undefined() -> None:
    defn = task(system=None, prompt="{% if lang is defined %}[{{ lang }}] {% endif %}{{ text }}")
    assert render_messages(defn, {"text": "x"})[0]["content"] == "x"
    assert render_messages(defn, {"text": "x", "lang": "fr"})[0]["content"] == "[fr] x"


def test_missing_attribute_of_present_value() -> None:
    defn = task(system=None, prompt="{{ items[0].name }} {{ items[0].nope }}")
    with pytest.raises(InvalidRequest) as info:
        render_messages(defn, {"text": "x", "items": [{"name": "a"}]})
    assert info.value.param == "input"
    assert "nope" in info.value.message


@pytest.mark.parametrize(
    "prompt",
    ["{{ text.__class__.__mro__[1].__subclasses__() }}", "{{ text['__class__'] }}", "{{ text|attr('__init__') }}",
     "{% set f = text.__len__ %}{{ f }}"],
)
def test_a_template_reaching_for_underscored_attributes_is_refused_when_checked(prompt: str) -> None:
    with pytest.raises(ValidationError) as info:
        task(system=None, prompt=prompt)
    assert "is not allowed (the sandbox refuses attributes that start with '_')" in str(info.value)
    assert "line 1" in str(info.value)


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ("{{ text.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),  # (a definition not checked)
        ("{{ 1 / 0 if text == 'zero' else text }}", "ZeroDivisionError: division by zero"),
        ("{{ text.upper(1) }}", "TypeError"),
    ],
)
def test_a_template_that_raises_is_a_template_error_not_a_crash(prompt: str, words: str) -> None:
    defn = task(system=None).model_copy(update={"prompt": prompt})
    with pytest.raises(TemplateFailed) as info:
        render_messages(defn, {"text": "zero"})
    assert info.value.status_code == 422 and info.value.code == "template_error"
    assert words in info.value.message and "promptfleet tasks render" in info.value.message


@pytest.mark.parametrize(
    ("task_input", "param", "words"),
    [
        ({}, "input.text", "'text' is a required property"),
        ({"text": 5}, "input.text", "5 is not of type 'string'"),
        ({"text": "x" * 60}, "input.text", "is too long"),
        ({"text": "x", "extra": 1}, "input.extra", "'extra' was unexpected"),
        ({"text": "x", "items": [{"name": "a"}, {}]}, "input.items[1].name", "'name' is a required property"),
        ({"text": "x", "email": "not an email"}, "input.email", "is not a 'email'"),
        ([1, 2], "input", "is not of type 'object'"),
    ],
)
def test_validate_input_names_the_path(task_input: Any, param: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_input(task(), task_input)
    assert info.value.param == param
    assert words in info.value.message
    assert info.value.status_code == 400


def test_validate_input_truncates_huge_values_in_the_message() -> None:
    with pytest.raises(InvalidRequest) as info:
        validate_input(task(), {"text": "x" * 100_000})
    assert len(info.value.message) < 500


def test_valid_input_passes() -> None:
    validate_input(task(), {"text": "x", "items": [{"name": "a"}], "email": "a@b.c"})


def test_response_format() -> None:
    defn = task(output_schema={"type": "object", "properties": {"a": {"type": "string"}}})
    assert response_format_for(defn) == {
        "type": "json_schema",
        "json_schema": {"name": "demo", "schema": defn.output_schema, "strict": True},
    }


def test_example_tasks_render_with_sample_input() -> None:
    defs = load_task_definitions(Path(__file__).resolve().parents[2] / "configs" / "tasks")
    samples: dict[str, dict[str, Any]] = {
        "extract_contact": {"text": "Write to Ada Lovelace <ada@example.com> at Analytical Engines Ltd."},
        "classify_ticket": {"subject": "Crash", "body": "The app crashes when I click save."},
        "summarize": {"text": "Ray Serve scales model serving. It runs on a Ray cluster."},
    }
    for name, sample in samples.items():
        validate_input(defs[name], sample)
        messages = render_messages(defs[name], sample)
        assert [m["role"] for m in messages] == ["system", "user"]
        assert all(v in messages[1]["content"] for v in sample.values())
        assert response_format_for(defs[name])["json_schema"]["name"] == name
    # The optional subject is optional in the template too.
    without_subject = render_messages(defs["classify_ticket"], {"body": "How do I log in?"})
    assert "Subject" not in without_subject[1]["content"]
