"""`promptfleet tasks check` and `render` offline, on good and broken files: every problem names its
file, line and field; structured-output support per provider; example expectations and the table."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import cli
from cluster.task_tests import Outcome, evaluate, field_value, table
from deployments.core.structured import schema_problems
from deployments.core.taskdefs import Expectation
from deployments.core.taskfile import check_sources, check_text

REPO = Path(__file__).resolve().parents[2]
MODELS = {"local": "llamacpp", "cloud": "openai"}
GOOD = """\
name: label
description: Label a text.
model: local
input_schema:
  type: object
  properties:
    text: {type: string}
  required: [text]
output_schema:
  type: object
  properties:
    label: {type: string, enum: [a, b]}
  required: [label]
  additionalProperties: false
prompt: "Label: {{ text }}"
examples:
  - name: first
    input: {text: hello}
    expect: {equals: {label: a}}
"""


def problems(text: str, models: dict[str, str] | None = MODELS, file: str = "label.yaml") -> list[str]:
    return [str(p) for p in check_text(text, file, models, stem=Path(file).stem).problems]


def test_a_good_file_passes_with_any_provider() -> None:
    assert problems(GOOD) == []
    assert problems(GOOD.replace("model: local", "model: cloud")) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("model: local", "model: gpt-9", "label.yaml:3: model: unknown model 'gpt-9' (configured: cloud, local)"),
        ('"Label: {{ text }}"', '"Label: {{ txt }}"', "label.yaml:15: prompt: template variable 'txt'"),
        ("name: label", "name: other", "label.yaml:1: name: 'other' must equal the file name 'label'"),
        ("input: {text: hello}", "input: {text: 3}", "label.yaml:18: examples[0].input.text: example input does "
         "not match input_schema: 3 is not of type 'string'"),
        ("    expect: {equals: {label: a}}", "    expect: {matches: {label: '[a'}}",
         "label.yaml:19: examples[0].expect.matches: label: not a valid regular expression"),
        ("description: Label a text.\n", "", "label.yaml:1: description: Field required"),
        ("    text: {type: string}", "    text: {type: strin}", "label.yaml:4: input_schema: not a valid JSON Schema"),
        ("    label: {type: string, enum: [a, b]}", "    label: {type: string, enum: [a, b], not: {const: b}}",
         "label.yaml:12: output_schema.properties.label.not: model 'local' (llamacpp): llama.cpp grammars cannot "
         "express negation"),
        ("  additionalProperties: false\n", "", "output_schema.additionalProperties:"),
        ("  required: [label]\n  additional", "  additional", "output_schema.required:"),
    ],
)
def test_every_problem_names_file_line_and_field(old: str, new: str, expected: str) -> None:
    text = GOOD.replace(old, new)
    assert text != GOOD
    models = MODELS
    if expected.startswith("output_schema."):  # OpenAI strict mode's rules: on the upstream model
        text = text.replace("model: local", "model: cloud")
    found = problems(text, models)
    assert any(expected in p for p in found), found
    assert all(re.match(r"label\.yaml:\d+: ", p) for p in found), found


def test_yaml_errors_name_the_line() -> None:
    assert problems("name: label\nprompt: [unclosed\n") == [
        "label.yaml:3: invalid YAML: expected ',' or ']', but got '<stream end>'"]


def test_numeric_bounds_are_warnings_on_llamacpp_and_the_file_is_accepted() -> None:
    text = GOOD.replace("    label: {type: string, enum: [a, b]}", "    label: {type: string, enum: [a, b]}\n"
                        "    n: {type: integer, minimum: 1}")
    checked = check_text(text, "label.yaml", MODELS, stem="label")
    assert checked.definition is not None and checked.errors == []
    assert [p.warning for p in checked.problems] == [True] and "minimum" in checked.problems[0].field


def test_fallback_models_must_express_the_schema_too() -> None:
    text = GOOD.replace("model: local", "model: local\nfallback_models: [cloud]").replace(
        "  additionalProperties: false\n", "")
    assert any("model 'cloud' (openai)" in p for p in problems(text))


@pytest.mark.parametrize(
    ("schema", "provider", "words"),
    [
        ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}, "llamacpp",
         "cannot turn this schema into a grammar"),
        ({"type": "array", "items": {"type": "string"}}, "openai", "object at the root"),
        ({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}},
                                                 "required": ["b"]}}, "required": ["a"],
          "additionalProperties": False}, "openai", "additionalProperties"),
        ({"type": "object", "allOf": [{"type": "object"}], "additionalProperties": False}, "openai", "allOf"),
        ({"type": "array", "uniqueItems": True}, "llamacpp", "unique items"),
    ],
)
def test_structured_output_rules(schema: dict[str, Any], provider: str, words: str) -> None:
    found = schema_problems(schema, provider)
    assert any(words in message and not warning for _, message, warning in found), found


def test_schemas_the_providers_express_pass() -> None:
    shipped = yaml.safe_load((REPO / "configs/tasks/extract_contact.yaml").read_text())["output_schema"]
    assert schema_problems(shipped, "llamacpp") == []
    assert schema_problems(shipped, "openai") == []


def test_duplicate_task_names_across_files() -> None:
    checked = check_sources([("label.yaml", GOOD), ("sub/label.yaml", GOOD)], MODELS)
    assert checked[0].definition is not None and checked[1].definition is None
    assert "sub/label.yaml:1: name: duplicate task name 'label' (also in label.yaml)" in map(str, checked[1].problems)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def serve_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs/serve.yaml").read_text())
    config["applications"][0]["args"]["models"].append({"name": "cloud", "provider": "openai", "base_url": "x"})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_check_exit_codes_and_output(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "label.yaml").write_text(GOOD.replace("model: local", "model: smollm2"))
    code, out, _ = run_cli(["tasks", "check", str(tasks), "--config", str(serve_config(tmp_path))])
    assert code == 0 and "1/1 task files ok, 0 error(s), 0 warning(s)" in out
    (tasks / "broken.yaml").write_text(GOOD.replace("name: label", "name: broken").replace("model: local",
                                                                                            "model: gpt-9"))
    code, out, _ = run_cli(["tasks", "check", str(tasks), "--config", str(serve_config(tmp_path))])
    assert code == 1 and f"{tasks / 'broken.yaml'}:3: model: unknown model 'gpt-9' (configured: cloud, smollm2)" in out
    assert "1/2 task files ok, 1 error(s), 0 warning(s)" in out
    (tasks / "broken.yaml").write_text("name: broken\nprompt: [\n")
    code, out, _ = run_cli(["tasks", "check", str(tasks), "--config", str(serve_config(tmp_path))])
    assert code == 1 and f"{tasks / 'broken.yaml'}:3: invalid YAML" in out and "1/2 task files ok, 1 error(s)" in out


def test_cli_check_shipped_tasks_and_strict_warnings(tmp_path: Path) -> None:
    code, out, _ = run_cli(["tasks", "check", str(REPO / "configs/tasks")])
    assert code == 0 and "3/3 task files ok" in out
    bounded = "    label: {type: string, enum: [a, b]}\n    k: {type: integer, maximum: 3}"
    (tmp_path / "n.yaml").write_text(GOOD.replace("name: label", "name: n").replace("model: local", "model: smollm2")
                                     .replace("    label: {type: string, enum: [a, b]}", bounded))
    config = str(serve_config(tmp_path))
    assert run_cli(["tasks", "check", str(tmp_path / "n.yaml"), "--config", config])[0] == 0
    code, out, _ = run_cli(["tasks", "check", str(tmp_path / "n.yaml"), "--config", config, "--strict"])
    assert code == 1 and "warning: model 'smollm2' (llamacpp): 'maximum' is not enforced" in out


def test_cli_render_offline(tmp_path: Path) -> None:
    code, out, _ = run_cli(["tasks", "render", "classify_ticket", "--dir", str(REPO / "configs/tasks"),
                            "--input", '{"body": "It crashes.", "subject": "Crash"}'])
    assert code == 0
    rendered = json.loads(out)
    assert [m["role"] for m in rendered["messages"]] == ["system", "user"]
    user = rendered["messages"][1]["content"]
    assert "Subject: Crash" in user and "It crashes." in user
    assert rendered["response_format"]["json_schema"]["strict"] is True
    code, _, err = run_cli(["tasks", "render", "classify_ticket", "--dir", str(REPO / "configs/tasks"),
                            "--input", '{"subject": "no body"}'])
    assert code == 1 and "input.body" in err
    code, _, err = run_cli(["tasks", "render", "classify_ticket", "--input", "{nope"])
    assert code == 2 and "--input is not JSON" in err
    (tmp_path / "label.yaml").write_text(GOOD.replace('"Label: {{ text }}"', '"Label: {{ txt }}"'))
    code, _, err = run_cli(["tasks", "render", "label", "--dir", str(tmp_path), "--input", '{"text": "x"}'])
    assert code == 1 and "label.yaml:15: prompt: template variable 'txt'" in err


def test_expectations() -> None:
    ok = {"task": "t", "output": {"label": "a", "items": [{"name": "Ann"}]}, "model": "m"}
    assert evaluate(Expectation(), 200, ok) == []
    assert evaluate(Expectation.model_validate({"equals": {"label": "a", "items.0.name": "Ann"}}), 200, ok) == []
    assert evaluate(Expectation.model_validate({"equals": {"label": "b"}}), 200, ok) == ['label: "a" != "b"']
    assert evaluate(Expectation.model_validate({"equals": {"nope": 1}}), 200, ok) == ["nope: missing (expected 1)"]
    assert evaluate(Expectation.model_validate({"matches": {"items.0.name": "^A"}}), 200, ok) == []
    assert "does not match" in evaluate(Expectation.model_validate({"matches": {"label": "^b"}}), 200, ok)[0]
    schema = {"schema": {"properties": {"label": {"const": "b"}}}}
    assert evaluate(Expectation.model_validate(schema), 200, ok)[0].startswith("schema: label:")
    failed = {"error": {"code": "task_failed", "message": "never valid"}}
    assert evaluate(Expectation(), 422, failed) == ["run failed: 422 task_failed: never valid"]
    assert evaluate(Expectation(valid=False), 422, failed) == []
    assert evaluate(Expectation(valid=False), 200, ok) == ["expected the run to fail, but it succeeded"]
    assert field_value([1, [2, 3]], "1.0") == 2


def test_table_has_a_row_per_example_and_pass_rates() -> None:
    text = table([Outcome("t", "one", True, "ok", "m", 2, 0.5), Outcome("t", "two", False, "label: 1 != 2", "m", 2),
                  Outcome("u", "x", True, "ok")])
    lines = text.splitlines()
    assert lines[0].split() == ["TASK", "EXAMPLE", "RESULT", "MODEL", "VERSION", "TIME", "REASON"]
    assert lines[2].split()[:3] == ["t", "two", "FAIL"] and lines[2].endswith("label: 1 != 2")
    assert "t: 1/2 passed (50%)" in lines and "u: 1/1 passed (100%)" in lines and lines[-1] == "total: 2/3 passed (67%)"


def test_hostile_text_is_a_problem_not_a_crash() -> None:
    for text in ["[" * 20_000, "a: " + "{b: " * 5000 + "1" + "}" * 5000, "\x00", "name: !!python/object:os.system x"]:
        checked = check_text(text, "x.yaml", MODELS, stem="x")
        assert checked.definition is None and checked.problems, text[:40]


def test_yaml_anchors_and_aliases_are_refused_naming_the_line() -> None:
    """Aliases expand into the stored definition: a few nested ones made a small file ~900x larger."""
    aliased = GOOD.replace("  properties:\n    text: {type: string}", "  properties: &props\n    text: {type: string}")
    aliased += "extra: *props\n"
    assert problems(aliased) == ["label.yaml:6: invalid YAML: anchors and aliases (&name, *name, <<: *name) "
                                 "are not accepted; write the value out"]
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in zip("abcdefg", "bcdefgh", strict=True))
    (found,) = problems(laughs)
    assert found.startswith("label.yaml:1: invalid YAML: anchors and aliases")
    assert problems(GOOD) == []  # and a plain file still passes


def test_a_definition_over_the_size_limit_is_a_problem_naming_the_file() -> None:
    big = GOOD.replace('"Label: {{ text }}"', '"Label: {{ text }} ' + "y" * 6000 + '"')
    (found,) = [str(p) for p in check_text(big, "label.yaml", MODELS, stem="label", max_definition_bytes=5000).problems]
    assert re.fullmatch(r"label\.yaml: the stored definition would be \d+ bytes, over the limit of 5000 "
                        r"\(tasks\.max_definition_bytes\)", found), found
    assert check_text(big, "label.yaml", MODELS, stem="label", max_definition_bytes=8000).definition is not None
