"""Task files: from YAML text to a checked ``TaskDefinition``, every problem naming file, line and field.

One checker for every place a task enters the system — the deploy (``load_task_definitions``:
``configs/tasks/``), ``promptfleet tasks check`` (offline, on files) and ``POST /v1/tasks/push``
(text sent by the CLI) — so a file that passes ``check`` is one the cluster accepts. It checks:
YAML syntax, fields and types (``TaskDefinition``), both JSON Schemas, template syntax, template
variables against the input schema, file name == task name, examples (inputs valid, judge
templates), that the templates render — with each example's input, or without examples with a
sample input made from the input schema — in the same bounded sandbox and budgets as a run
(``core.sandbox``: a template that can never render is refused before it ships), and, given the
models (name → provider), that every model exists and that the output schema is one the model's
structured-output support can express (``core.structured``).

YAML anchors and aliases (``&a``, ``*a``, ``<<: *a``) are refused, naming their line: an alias is
expanded into the stored definition (a few aliases of aliases grow a small file ~900×). The stored
definition (canonical JSON) has a size limit too (``tasks.max_definition_bytes``, default
``DEFAULT_MAX_DEFINITION_BYTES``): a file over it is a problem naming the file, not a failure later.

Lines come from PyYAML's node marks (``yaml.compose``): a field path such as
``output_schema.properties.label`` is looked up in the node tree, and the deepest node found names
the line. Pure: no I/O but reading the files handed to ``load_task_definitions``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import yaml
from jinja2 import meta
from jsonschema import Draft202012Validator
from pydantic import ValidationError

from deployments.config import TasksConfig
from deployments.core.prompting import (
    DEFAULT_LIMITS,
    RenderLimits,
    format_json_path,
    render_template,
    template_environment,
)
from deployments.core.sandbox import RenderLimitExceeded, budget_for
from deployments.core.structured import schema_problems
from deployments.core.taskdefs import STORED, TaskConfigError, TaskDefinition

__all__ = [
    "DEFAULT_MAX_DEFINITION_BYTES",
    "CheckedTask",
    "Problem",
    "check_files",
    "check_sources",
    "check_text",
    "content_hash",
    "load_task_definitions",
    "load_task_files",
    "parse_stored",
    "sample_input",
    "task_files",
]

Path_ = tuple[str | int, ...]
DEFAULT_MAX_DEFINITION_BYTES = TasksConfig.model_fields["max_definition_bytes"].default


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases where it meets them (see the module docstring)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.MarkedYAMLError(
                problem="anchors and aliases (&name, *name, <<: *name) are not accepted; write the value out",
                problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def _load(text: str) -> tuple[yaml.Node | None, Any]:
    """The document's node tree (for lines) and its data, from one parse."""
    loader = _NoAliasLoader(text)
    try:
        root = loader.get_single_node()
        return root, loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()


RENDER_CHECK_FACTOR = 4  # the render checks of one push may take this many render timeouts …
RENDER_CHECK_MIN_S = 10.0  # … and at least this long


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a task file. ``warning``: reported, but the file is accepted."""

    file: str
    field: str
    message: str
    line: int | None = None
    warning: bool = False

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{'warning: ' if self.warning else ''}{self.message}"


@dataclass(frozen=True)
class CheckedTask:
    """A file's definition (None if it has errors), its problems, and its text."""

    file: str
    source: str
    definition: TaskDefinition | None
    problems: list[Problem]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if not p.warning]


def canonical(defn: TaskDefinition) -> str:
    """The definition as canonical JSON (what is stored, and hashed)."""
    data = defn.model_dump(mode="json", by_alias=True)
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(defn: TaskDefinition) -> str:
    return hashlib.sha256(canonical(defn).encode()).hexdigest()


def _line_of(root: yaml.Node | None, path: Path_) -> int | None:
    """1-based line of the deepest node of ``path`` found under ``root``."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in path:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


def _template_variables(source: str) -> set[str]:
    """Top-level variables a template reads (including ones guarded by ``is defined``)."""
    return meta.find_undeclared_variables(template_environment().parse(source))


_SAMPLE_FORMATS = {
    "date": "2024-01-31", "date-time": "2024-01-31T12:00:00Z", "time": "12:00:00Z", "email": "someone@example.com",
    "uri": "https://example.com/", "uuid": "00000000-0000-4000-8000-000000000000", "hostname": "example.com",
    "ipv4": "192.0.2.1", "ipv6": "2001:db8::1",
}


def _sample(schema: Any, depth: int = 0) -> Any:
    """A small value ``schema`` probably accepts (checked by the caller)."""
    if not isinstance(schema, Mapping) or depth > 20:
        return None
    for key in ("const", "default"):
        if key in schema:
            return schema[key]
    for key in ("enum", "examples"):
        if isinstance(schema.get(key), list) and schema[key]:
            return schema[key][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return _sample(schema[key][0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        properties = schema.get("properties", {})
        value = {name: _sample(sub, depth + 1) for name, sub in properties.items()} if isinstance(
            properties, Mapping) else {}
        for name in schema.get("required", []) if isinstance(schema.get("required"), list) else []:
            value.setdefault(str(name), "x")
        return value
    if kind == "array":
        count = schema.get("minItems", 1) if isinstance(schema.get("minItems", 1), int) else 1
        return [_sample(schema.get("items", {}), depth + 1) for _ in range(min(max(count, 1), 10))]
    if kind == "string":
        fmt = schema.get("format")
        if fmt in _SAMPLE_FORMATS:
            return _SAMPLE_FORMATS[fmt]
        length = schema.get("minLength", 5)
        return "x" * (min(length, 1000) if isinstance(length, int) else 5)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        low = low if isinstance(low, int | float) and not isinstance(low, bool) else 0
        return int(low) + 1 if kind == "integer" else float(low) + 1
    if kind == "boolean":
        return True
    return None


def sample_input(input_schema: dict[str, Any]) -> dict[str, Any] | None:
    """A small input ``input_schema`` accepts (every property given), or None if none is found simply."""
    value = _sample(input_schema)
    if not isinstance(value, dict):
        return None
    validator = Draft202012Validator(input_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    return value if validator.is_valid(value) else None


def render_check_deadline(limits: RenderLimits) -> float:
    """When the render checks of one check or push must be done by (monotonic): each template renders
    within ``limits``, and all of them within ``RENDER_CHECK_FACTOR`` × its timeout (at least
    ``RENDER_CHECK_MIN_S``), so a push of many slow templates cannot hold a Gateway thread and a core
    for minutes."""
    return time.monotonic() + max(RENDER_CHECK_MIN_S, RENDER_CHECK_FACTOR * limits.timeout_s)


def _render_problems(defn: TaskDefinition, limits: RenderLimits, deadline: float) -> list[tuple[Path_, str, bool]]:
    """Render the task's templates with each valid example input (or, without examples, a sample input
    from the input schema) as a run would: an error names the template field and the input. Past
    ``deadline`` (shared by the files of one push) a render is refused unchecked."""
    validator = Draft202012Validator(defn.input_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    inputs = [(f"example '{e.name}'", e.input) for e in defn.examples if validator.is_valid(e.input)]
    if not defn.examples:
        sample = sample_input(defn.input_schema)
        if sample is not None:
            shown = json.dumps(sample, ensure_ascii=False)
            shown = shown if len(shown) <= 200 else shown[:199] + "…"
            inputs = [(f"a sample input made from input_schema ({shown}; add an example to choose the input)",
                       sample)]
    found: list[tuple[Path_, str, bool]] = []
    for what, value in inputs:
        left = deadline - time.monotonic()
        if left <= 0:
            return [(("prompt",), "not checked: the render checks of this push took longer than "
                     f"{max(RENDER_CHECK_MIN_S, RENDER_CHECK_FACTOR * limits.timeout_s):g}s in total; push fewer "
                     "files at once",
                     False)]
        if left < limits.timeout_s:
            limits = RenderLimits(timeout_s=left, max_chars=limits.max_chars)
        with budget_for(limits):  # one budget for both templates, as a run has
            for field in ("system", "prompt"):
                source = getattr(defn, field)
                if source is None:
                    continue
                try:
                    render_template(source, value, limits)
                except RenderLimitExceeded as exc:
                    reason = exc.message
                except Exception as exc:  # whatever a run would get as a 422 template_error or 400
                    reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
                else:
                    continue
                found.append(((field,), f"the template cannot render with {what}: {reason}", False))
                break
    return found


def _semantic_problems(defn: TaskDefinition, stem: str | None, models: Mapping[str, str] | None,
                       limits: RenderLimits | None, deadline: float) -> list[tuple[Path_, str, bool]]:
    """(path, message, warning) of what the model validation cannot see on its own."""
    found: list[tuple[Path_, str, bool]] = []
    if stem is not None and stem != defn.name:
        found.append((("name",), f"'{defn.name}' must equal the file name '{stem}'", False))
    # A variable the input schema does not declare can never be supplied by a valid input,
    # so the task would fail on every request; catch the typo before it ships.
    declared = set(defn.input_schema.get("properties", {}))
    for field in ("system", "prompt"):
        source = getattr(defn, field)
        for var in sorted(_template_variables(source) - declared) if source is not None else []:
            found.append(((field,), f"template variable '{var}' is not a property of input_schema", False))
    input_check = Draft202012Validator(defn.input_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    seen: set[str] = set()
    for i, example in enumerate(defn.examples):
        if example.name in seen:
            found.append((("examples", i, "name"), f"duplicate example name '{example.name}'", False))
        seen.add(example.name)
        for error in sorted(input_check.iter_errors(example.input), key=lambda e: list(e.absolute_path))[:3]:
            found.append((("examples", i, "input", *error.absolute_path),
                          f"example input does not match input_schema: {error.message[:200]}", False))
        judge = example.expect.judge
        if judge is not None:
            for var in sorted(_template_variables(judge.prompt) - {"input", "output"}):
                found.append((("examples", i, "expect", "judge", "prompt"),
                              f"judge template variable '{var}' is neither 'input' nor 'output'", False))
    if limits is not None and not found:  # a task with other errors would not render meaningfully
        found += _render_problems(defn, limits, deadline)
    if models is not None:
        listing = ", ".join(sorted(models)) or "none"
        named: list[tuple[Path_, str]] = [(("model",), defn.model)]
        named += [(("fallback_models", i), m) for i, m in enumerate(defn.fallback_models)]
        named += [(("examples", i, "expect", "judge", "model"), e.expect.judge.model)
                  for i, e in enumerate(defn.examples) if e.expect.judge is not None]
        for path, model in named:
            if model not in models:
                found.append((path, f"unknown model '{model}' (configured: {listing})", False))
        # Every model that may answer gets the same response_format: each must be able to express it.
        for model in dict.fromkeys([defn.model, *defn.fallback_models]):
            provider = models.get(model)
            if provider is None:
                continue
            for sub, message, warning in schema_problems(defn.output_schema, provider):
                found.append((("output_schema", *sub), f"model '{model}' ({provider}): {message}", warning))
    return found


def check_text(text: str, file: str, models: Mapping[str, str] | None = None,
               stem: str | None = None, max_definition_bytes: int = DEFAULT_MAX_DEFINITION_BYTES,
               limits: RenderLimits | None = DEFAULT_LIMITS, deadline: float | None = None) -> CheckedTask:
    """Check one task file's ``text``; ``file`` names it in problems, ``stem`` (the file name without
    its suffix) must equal the task's name if given, ``models`` (name → ``llamacpp``/``openai``)
    enables the model checks; its canonical definition may be at most ``max_definition_bytes``;
    ``limits`` are the render budgets its templates must render within (None: no render check),
    ``deadline`` ends the render checks (``render_check_deadline``)."""
    try:
        return _check_text(text, file, models, stem, max_definition_bytes, limits,
                           deadline if deadline is not None else render_check_deadline(limits or DEFAULT_LIMITS))
    except RecursionError:  # `[[[[…` a few thousand deep: the parsers and schema walks recurse
        return CheckedTask(file, text, None, [Problem(file, "", "nested too deeply to check")])


def _check_text(text: str, file: str, models: Mapping[str, str] | None, stem: str | None,
                max_definition_bytes: int, limits: RenderLimits | None, deadline: float) -> CheckedTask:
    def problem(path: Path_, message: str, warning: bool = False) -> Problem:
        return Problem(file, format_json_path(path), message, _line_of(root, path), warning)

    root: yaml.Node | None = None
    try:
        root, data = _load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        reason = " ".join(str(getattr(exc, "problem", None) or exc).split())
        line = mark.line + 1 if mark is not None else None
        return CheckedTask(file, text, None, [Problem(file, "", f"invalid YAML: {reason}", line)])
    if not isinstance(data, dict):
        return CheckedTask(file, text, None, [problem((), f"expected a mapping of fields, got {type(data).__name__}")])
    try:
        defn = TaskDefinition.model_validate(data)
    except ValidationError as exc:
        problems = [problem(tuple(err["loc"]), err["msg"].removeprefix("Value error, "))
                    for err in exc.errors(include_url=False)]
        return CheckedTask(file, text, None, problems)
    defn._source = file
    size = len(canonical(defn).encode())
    if size > max_definition_bytes:
        return CheckedTask(file, text, None, [Problem(
            file, "", f"the stored definition would be {size} bytes, over the limit of {max_definition_bytes} "
            "(tasks.max_definition_bytes)")])
    found = _semantic_problems(defn, stem, models, limits, deadline)
    problems = [problem(path, message, warning) for path, message, warning in found]
    accepted = defn if not any(not p.warning for p in problems) else None
    return CheckedTask(file, text, accepted, problems)


def task_files(paths: Iterable[Path]) -> list[Path]:
    """The task files among ``paths``: files as given, directories' ``*.yaml``/``*.yml`` (not recursive)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        else:
            files.append(path)
    return files


def check_sources(sources: Sequence[tuple[str, str]], models: Mapping[str, str] | None = None,
                  max_definition_bytes: int = DEFAULT_MAX_DEFINITION_BYTES,
                  limits: RenderLimits | None = DEFAULT_LIMITS) -> list[CheckedTask]:
    """Check each ``(file name, text)`` (templates rendered within ``limits``), and that no two define
    the same task."""
    checked: list[CheckedTask] = []
    names: dict[str, str] = {}
    deadline = render_check_deadline(limits or DEFAULT_LIMITS)
    for file, text in sources:
        result = check_text(text, file, models, stem=PurePath(file).stem,
                            max_definition_bytes=max_definition_bytes, limits=limits, deadline=deadline)
        if result.definition is not None:
            name = result.definition.name
            if name in names:
                duplicate = Problem(file, "name", f"duplicate task name '{name}' (also in {names[name]})",
                                    _line_of(yaml.compose(text, Loader=yaml.SafeLoader), ("name",)))
                result = CheckedTask(result.file, text, None, [*result.problems, duplicate])
            else:
                names[name] = file
        checked.append(result)
    return checked


def check_files(files: Sequence[Path], models: Mapping[str, str] | None = None,
                max_definition_bytes: int = DEFAULT_MAX_DEFINITION_BYTES) -> list[CheckedTask]:
    """``check_sources`` of files on disk; a file that cannot be read is a problem of its own."""
    sources: list[tuple[str, str]] = []
    unreadable: list[CheckedTask] = []
    for path in files:
        try:
            sources.append((str(path), path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(CheckedTask(str(path), "", None, [Problem(str(path), "", f"cannot read file: {exc}")]))
    return unreadable + check_sources(sources, models, max_definition_bytes=max_definition_bytes)


def load_task_files(directory: Path, models: Mapping[str, str] | None = None,
                    max_definition_bytes: int = DEFAULT_MAX_DEFINITION_BYTES) -> list[CheckedTask]:
    """Check every ``*.yaml`` / ``*.yml`` file in ``directory`` (not recursive): the deploy's task files.

    Raises ``TaskConfigError`` listing every error found, one per line, each as
    ``<file>:<line>: <field>: <what is wrong>``; duplicate task names are an error too.
    """
    if not directory.is_dir():
        raise TaskConfigError(f"{directory}: task definition directory does not exist")
    checked = check_files(task_files([directory]), models, max_definition_bytes)
    problems = [str(p) for c in checked for p in c.errors]
    if problems:
        raise TaskConfigError("\n".join(problems))
    return checked


def load_task_definitions(directory: Path, models: Mapping[str, str] | None = None) -> dict[str, TaskDefinition]:
    """``load_task_files``' definitions, keyed by name."""
    return {c.definition.name: c.definition for c in load_task_files(directory, models) if c.definition is not None}


def parse_definition(data: dict[str, Any], source: str = "<store>") -> TaskDefinition:
    """A stored definition (canonical JSON, already checked when it was stored: ``taskdefs.STORED``)."""
    defn = TaskDefinition.model_validate(data, context=STORED)
    defn._source = source
    return defn


def parse_stored(definition: str, source: str = "<store>") -> TaskDefinition:
    """``parse_definition`` of a stored definition's canonical JSON text (a catalogue page's), without
    repeating the checks it passed when it was stored (``taskdefs.STORED``)."""
    defn = TaskDefinition.model_validate_json(definition, context=STORED)
    defn._source = source
    return defn
