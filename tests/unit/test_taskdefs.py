"""Task definition loading: good files load, every kind of bad file names its file and field."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.core.taskdefs import TaskConfigError, TaskDefinition
from deployments.core.taskfile import load_task_definitions

VALID: dict[str, Any] = {
    "name": "classify",
    "description": "Classify a ticket.",
    "model": "smollm2",
    "input_schema": {
        "type": "object",
        "properties": {"text": {"type": "string"}},
        "required": ["text"],
    },
    "output_schema": {
        "type": "object",
        "properties": {"label": {"enum": ["bug", "feature"]}},
        "required": ["label"],
    },
    "system": "You classify tickets.",
    "prompt": "Classify: {{ text }}",
}


def write(directory: Path, data: Any, name: str = "classify", suffix: str = ".yaml") -> Path:
    path = directory / f"{name}{suffix}"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def load_error(directory: Path) -> str:
    with pytest.raises(TaskConfigError) as info:
        load_task_definitions(directory)
    return str(info.value)


def test_valid_file_loads_with_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, VALID)
    defs = load_task_definitions(tmp_path)
    assert list(defs) == ["classify"]
    defn = defs["classify"]
    assert defn.model == "smollm2"
    assert defn.fallback_models == []
    assert (defn.temperature, defn.max_tokens, defn.max_attempts, defn.timeout_s) == (0.0, 256, 3, 60.0)
    assert defn.source == str(path)


def test_definition_pickles_with_its_source(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    defn = load_task_definitions(tmp_path)["classify"]
    copy = pickle.loads(pickle.dumps(defn))
    assert copy == defn
    assert copy.source == defn.source


def test_every_field_has_a_description() -> None:
    for name, field in TaskDefinition.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"name": "Bad Name"}, "name", "pattern"),
        ({"max_attempts": 0}, "max_attempts", "greater than or equal to 1"),
        ({"max_attempts": 11}, "max_attempts", "less than or equal to 10"),
        ({"timeout_s": 0}, "timeout_s", "greater than 0"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"promt": "typo"}, "promt", "Extra inputs are not permitted"),
        ({"output_schema": {"type": "objekt"}}, "output_schema", "not a valid JSON Schema at type"),
        ({"output_schema": {"properties": {"a": {"minLength": -1}}}}, "output_schema", "properties.a"),
        ({"input_schema": {"type": "array"}}, "input_schema", '"type": "object"'),
        ({"prompt": "Classify: {{ text "}, "prompt", "template error on line 1"),
        ({"system": "{% if %}"}, "system", "template error"),
        ({"prompt": "{{ text | nosuchfilter }}"}, "prompt", "nosuchfilter"),
        ({"prompt": "Classify: {{ txt }}"}, "prompt", "'txt' is not a property of input_schema"),
        ({"name": "other"}, "name", "must equal the file name 'classify'"),
    ],
)
def test_bad_field_names_file_and_field(
    tmp_path: Path, change: dict[str, Any], field: str, words: str
) -> None:
    path = write(tmp_path, {**VALID, **change})
    message = load_error(tmp_path)
    assert re.search(rf"{re.escape(str(path))}:\d+: {re.escape(field)}: ", message), message
    assert words in message


def test_missing_field(tmp_path: Path) -> None:
    data = dict(VALID)
    del data["output_schema"]
    path = write(tmp_path, data)
    assert f"{path}:1: output_schema: Field required" in load_error(tmp_path)  # the mapping's first line


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: classify\nprompt: [unclosed\n")
    message = load_error(tmp_path)
    assert message.startswith(f"{path}:3: invalid YAML")  # where the parser gave up


@pytest.mark.parametrize("text", ["", "- a list\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    message = load_error(tmp_path)
    assert message.startswith(str(path)) and "expected a mapping of fields" in message


def test_duplicate_names_across_yaml_and_yml(tmp_path: Path) -> None:
    first = write(tmp_path, VALID)
    second = write(tmp_path, VALID, suffix=".yml")
    message = load_error(tmp_path)
    assert re.search(rf"{re.escape(str(second))}:\d+: name: duplicate task name 'classify'", message)
    assert str(first) in message


def test_all_problems_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, {**VALID, "name": "one", "max_tokens": 0}, name="one")
    write(tmp_path, {**VALID, "name": "two", "model": ""}, name="two")
    lines = load_error(tmp_path).splitlines()
    assert any(re.search(r"one.yaml:\d+: max_tokens:", line) for line in lines)
    assert any(re.search(r"two.yaml:\d+: model:", line) for line in lines)


def test_other_files_are_ignored_and_missing_directory_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, VALID)
    (tmp_path / "README.md").write_text("not a task")
    assert list(load_task_definitions(tmp_path)) == ["classify"]
    assert "does not exist" in load_error(tmp_path / "nope")


def test_unknown_models_name_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, {**VALID, "fallback_models": ["smollm2", "gpt-9"]})
    assert load_task_definitions(tmp_path, {"smollm2": "llamacpp", "gpt-9": "llamacpp"})
    with pytest.raises(TaskConfigError) as info:
        load_task_definitions(tmp_path, {"smollm2": "llamacpp"})
    assert re.search(rf"{re.escape(str(path))}:\d+: fallback_models\[1\]: unknown model 'gpt-9'", str(info.value))
    with pytest.raises(TaskConfigError, match=r"classify.yaml:\d+: model: unknown model 'smollm2'"):
        load_task_definitions(tmp_path, {})


def test_example_task_files_load() -> None:
    directory = Path(__file__).resolve().parents[2] / "configs" / "tasks"
    defs = load_task_definitions(directory, {"smollm2": "llamacpp"})
    assert {"extract_contact", "classify_ticket", "summarize"} <= set(defs)
