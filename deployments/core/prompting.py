"""Prompt rendering and task-input validation for task definitions.

Serves the Gateway (``validate_input`` before a run is accepted, so a bad input is a 400 and
never a queued run; the render route), the TaskExecutor (``TemplateRenderer`` and
``response_format_for`` build the provider call) and the push checks. Calls nothing remote and
owns no state except a cache of compiled templates and the renderer's worker threads.

Templates run in the bounded sandbox of ``deployments.core.sandbox`` (Jinja2's
``SandboxedEnvironment`` with a time and a size budget per render) with ``StrictUndefined``: the
prompts team writes the templates, but the values come from clients, and a variable that silently
renders as an empty string would hide a broken task behind plausible-looking model output.

Servers render through ``TemplateRenderer``, in worker threads, never on their event loop: a
render is CPU work of up to ``RenderLimits.timeout_s``, and on the loop it would stall every other
request of the replica for that long. Threads rather than processes: the sandbox itself stops a
render at its deadline and before any operation outgrows its size budget (a thread cannot be
killed from outside, so it has to), which bounds CPU and memory without a second process per
replica (~40 MB each, three kinds of replica) and without pickling each definition and input
across a pipe; and it yields the GIL every millisecond, so the loop keeps answering while a
render runs (see docs: templates, for the measured stall).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn

from jinja2 import StrictUndefined, Template, Undefined, UndefinedError
from jinja2.utils import missing as _JINJA_MISSING
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from deployments.core.sandbox import DEFAULT_LIMITS, BoundedEnvironment, RenderLimitExceeded, RenderLimits, budget_for
from deployments.errors import InvalidRequest, TemplateFailed

if TYPE_CHECKING:  # taskdefs imports this module for template_environment(); avoid the cycle.
    from deployments.core.taskdefs import TaskDefinition

__all__ = [
    "DEFAULT_LIMITS",
    "RenderLimits",
    "TemplateRenderer",
    "format_json_path",
    "render_messages",
    "render_template",
    "response_format_for",
    "template_environment",
    "validate_input",
]

# jsonschema quotes the offending value in its messages; a client could send megabytes.
_MAX_MESSAGE_CHARS = 300


class _MissingValue(UndefinedError):
    """UndefinedError that remembers which name was missing (Jinja's only says it in text)."""

    def __init__(self, message: str, name: str | None, top_level: bool) -> None:
        super().__init__(message)
        self.name = name
        self.top_level = top_level


class _StrictUndefined(StrictUndefined):
    """StrictUndefined that raises ``_MissingValue``, so we never parse Jinja's message text."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> NoReturn:
        try:
            super()._fail_with_undefined_error(*args, **kwargs)
        except UndefinedError as exc:
            # _undefined_obj is Jinja's `missing` sentinel for a top-level variable, and the
            # parent object for a missing attribute/item (``user.name``).
            top_level = self._undefined_obj is _JINJA_MISSING
            raise _MissingValue(str(exc), self._undefined_name, top_level) from None


# Jinja binds the dunders (__str__, __iter__, __eq__, …) to the *base* function at class
# creation, so overriding the method alone does not reach them: rebind every such alias.
for _cls in (Undefined, StrictUndefined):
    for _attr, _value in vars(_cls).items():
        if _value is Undefined._fail_with_undefined_error:
            setattr(_StrictUndefined, _attr, _StrictUndefined._fail_with_undefined_error)
del _cls, _attr, _value


def template_environment(limits: RenderLimits = DEFAULT_LIMITS) -> BoundedEnvironment:
    """The one Jinja2 environment used to compile (at load time) and render task templates; a render
    outside ``budget_for`` gets ``limits``."""
    return BoundedEnvironment(
        undefined=_StrictUndefined,
        autoescape=False,  # prompts are plain text, not HTML
        keep_trailing_newline=False,
        limits=limits,
    )


_ENV = template_environment()


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> Template:
    # Keyed by source text, so a reloaded definition with a changed template gets recompiled
    # and TaskDefinition stays plain, picklable data (compiled templates do not pickle).
    return _ENV.from_string(source)


def render_template(source: str, variables: Mapping[str, Any], limits: RenderLimits = DEFAULT_LIMITS) -> str:
    """Render one template ``source`` in the bounded sandbox (raises what the template raises, and
    ``RenderLimitExceeded`` over a budget)."""
    with budget_for(limits):
        return _compile(source).render(variables)


def render_messages(
    defn: TaskDefinition, task_input: dict[str, Any], limits: RenderLimits = DEFAULT_LIMITS
) -> list[dict[str, str]]:
    """Render ``defn``'s templates with ``task_input`` into OpenAI chat messages, within ``limits``
    (one budget for the system and the user template together). Blocking: servers call it through
    ``TemplateRenderer``.

    Returns ``[{"role": "system", ...}]`` (only if the task has a system template) followed by
    ``{"role": "user", ...}``. A variable the templates need but the input lacks raises
    ``InvalidRequest`` with ``param="input.<name>"``; a missing attribute of a present value
    raises ``InvalidRequest`` with ``param="input"``. A template that raises, or a render over its
    time or size budget, raises ``TemplateFailed`` (422 ``template_error``; the message names the
    limit, e.g. ``tasks.render_timeout_s``).
    """
    messages: list[dict[str, str]] = []
    try:
        with budget_for(limits):
            if defn.system is not None:
                messages.append({"role": "system", "content": _compile(defn.system).render(task_input)})
            messages.append({"role": "user", "content": _compile(defn.prompt).render(task_input)})
    except _MissingValue as exc:
        if exc.top_level and exc.name is not None:
            raise InvalidRequest(
                f"Task '{defn.name}' needs input field '{exc.name}', which is missing.",
                param=f"input.{exc.name}",
            ) from None
        raise InvalidRequest(
            f"Task '{defn.name}' could not render its prompt from the input: {exc}",
            param="input",
        ) from None
    except RenderLimitExceeded as exc:
        raise TemplateFailed(f"Task '{defn.name}' could not render its prompt: {exc.message}.") from None
    except Exception as exc:  # the sandbox's SecurityError, 1/0, a filter given the wrong type, …
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:_MAX_MESSAGE_CHARS]
        raise TemplateFailed(
            f"Task '{defn.name}' could not render its prompt: {reason}. Its owners can reproduce this with "
            f"`promptfleet tasks render {defn.name} --input '…'`."
        ) from None
    return messages


RENDER_NICENESS = 10


def _lower_priority() -> None:
    """Run this render thread at a lower CPU priority (Linux schedules threads one by one): on a busy
    machine a long render gives way to the event loops and other processes, not the other way round."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), RENDER_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: renders are bounded all the same
        pass


class TemplateRenderer:
    """Renders task templates in a few worker threads of this process, within ``limits``.

    ``render`` never runs a template on the caller's event loop. The threads share the GIL, so more
    of them would not render faster; ``threads`` lets short renders run beside long ones that are
    running out their budget (the deadline is wall time, so hostile renders sharing the threads each
    get less CPU, not more time). Beyond ``threads`` renders at once, renders wait in line; memory is
    at most ``threads`` × one render's work budget."""

    def __init__(self, limits: RenderLimits = DEFAULT_LIMITS, threads: int = 8) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="promptfleet-render",
                                        initializer=_lower_priority)

    async def render(self, defn: TaskDefinition, task_input: dict[str, Any]) -> list[dict[str, str]]:
        """``render_messages`` in a worker thread (the caller's context, e.g. its request id, goes along)."""
        call = functools.partial(contextvars.copy_context().run, render_messages, defn, task_input, self.limits)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)


def format_json_path(parts: Iterable[str | int]) -> str:
    """``["items", 0, "name"]`` -> ``"items[0].name"`` (the empty path gives ``""``)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _truncate(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error_param(error: ValidationError) -> str:
    """The ``param`` for a schema error: the path of the offending field under ``input``."""
    parts: list[str | int] = list(error.absolute_path)
    instance, schema, expected = error.instance, error.schema, error.validator_value
    # For these two the offending key is not on the path (the error sits on the parent
    # object); name it anyway so the client sees exactly which field to add or remove.
    if error.validator == "required" and isinstance(instance, dict) and isinstance(expected, list):
        missing = [k for k in expected if k not in instance]
        if missing:
            parts.append(str(missing[0]))
    elif error.validator == "additionalProperties" and isinstance(instance, dict):
        if isinstance(schema, Mapping) and not schema.get("patternProperties"):
            known = schema.get("properties", {})
            extra = [k for k in instance if k not in known]
            if extra:
                parts.append(str(extra[0]))
    path = format_json_path(parts)
    return f"input.{path}" if path else "input"


def validate_input(defn: TaskDefinition, task_input: Any) -> None:
    """Check ``task_input`` against ``defn.input_schema``.

    Raises ``InvalidRequest`` for the most relevant error (jsonschema's ``best_match``), with
    ``param`` set to ``input.<path>`` (``input.text``, ``input.items[0].name``) and a message
    saying what is wrong. ``format`` keywords are asserted, not just annotations.
    """
    validator = Draft202012Validator(defn.input_schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    error = best_match(validator.iter_errors(task_input))
    if error is None:
        return
    param = _error_param(error)
    raise InvalidRequest(
        f"Invalid input for task '{defn.name}' at {param}: {_truncate(error.message)}",
        param=param,
    )


def response_format_for(defn: TaskDefinition) -> dict[str, Any]:
    """The OpenAI ``response_format`` asking the provider for JSON matching the output schema.

    ``strict: True`` makes OpenAI enforce the schema, but OpenAI's strict mode accepts only a
    subset of JSON Schema (object root, ``additionalProperties: false``, every property
    required); llama.cpp turns the schema into a grammar instead.
    """
    # OpenAI allows only [a-zA-Z0-9_-]{1,64} here; slugs already fit, this is a safety net.
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", defn.name)[:64] or "output"
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": defn.output_schema, "strict": True},
    }
