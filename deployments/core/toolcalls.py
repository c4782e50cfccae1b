"""Function tools on a local model (pure): the prompt, the grammar, and reading the call back.

A local model has no native tool-call format that every GGUF shares, so promptfleet gives it one
(as llama-cpp-python's ``chatml-function-calling`` handler and llama.cpp's server do, each their
own way):

- **Prompt.** A system message lists the functions (name, description, JSON Schema of the
  parameters) and says how to call one: answer with only ``{"name": …, "arguments": {…}}``.
- **Grammar.** The answer is generated under a llama.cpp grammar compiled from one JSON Schema,
  ``{"name": {"const": <function>}, "arguments": <its parameters>}`` (``anyOf`` over the tools), so a
  call always names a real function and its arguments parse and match that function's schema
  (within what llama.cpp grammars enforce: ``core.structured``). The same bounds as
  ``response_format`` hold hostile schemas off (``core.grammar``).
- **tool_choice.** ``required``: the grammar is the call and nothing else. A named function: the
  call with that one function. ``none``: no tools in the prompt, no grammar, plain text. ``auto``:
  the model starts without a grammar and chooses with its first non-blank token: ``{`` opens a
  call — that start is dropped and the answer is generated again under the call's grammar (the
  prompt is still in llama.cpp's cache, so this costs about one token) — anything else is a text
  answer, generated unconstrained. (A grammar "call or text" would hold text answers to a grammar
  too, and decoding under a grammar runs at about half speed: measured 8.3 against 14.7 tok/s.)
- **Turns.** An assistant message's ``tool_calls`` are shown to the model as the JSON it would have
  written; a ``role: tool`` message becomes a user message "Result of <function> …" (chat templates
  of many GGUFs know no ``tool`` role), and must answer a call of an earlier assistant message.

One call per turn: a local model's answer is a single call (``parallel_tool_calls`` is accepted,
as OpenAI allows a model to make fewer calls than it may).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from deployments.core.structured import schema_problems
from deployments.errors import InvalidRequest

_DEFS = ("$defs", "definitions")
# The call's opening as the grammar writes it (``json_schema_to_gbnf``'s ``space`` is at most one
# blank or newline run; tolerate any whitespace).
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_TRAILER = re.compile(r"\s*(\}\s*)?$")


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class ToolPlan:
    """What a local generation does about tools: the mode, the functions, the grammar source."""

    mode: str  # "none" | "auto" | "required"
    functions: list[dict[str, Any]] = field(default_factory=list)  # {name, description, parameters}
    schema: dict[str, Any] | None = None  # the JSON Schema of one call

    @property
    def calls(self) -> bool:
        return self.mode != "none" and bool(self.functions)

    @property
    def probes(self) -> bool:
        """``auto``: the answer starts unconstrained, and becomes a call if it opens with ``{``."""
        return self.mode == "auto" and self.calls

    def gbnf(self) -> str | None:
        """The llama.cpp grammar the answer starts under (None: unconstrained text)."""
        return self.call_gbnf() if self.mode == "required" else None

    def call_gbnf(self) -> str | None:
        """The grammar of one call of one of the functions."""
        if not self.calls or self.schema is None:
            return None
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        call: str = json_schema_to_gbnf(json.dumps(self.schema))
        return call

    def system_prompt(self) -> str:
        listed = json.dumps(self.functions, ensure_ascii=False)
        how = ('To call a function, reply with only a JSON object {"name": <function name>, '
               '"arguments": <object matching its parameters>}.')
        if self.mode == "required":
            return f"You must call one of these functions: {listed}\n{how}"
        return (f"You can call these functions: {listed}\n{how} "
                "Call a function only when it is needed to answer; otherwise answer in plain text.")


def plan(body: dict[str, Any], model: str) -> ToolPlan:
    """The tool plan of a chat body for a local model; 400 naming the field it cannot honour."""
    tools = body.get("tools") or []
    choice = body.get("tool_choice")
    if choice is None:
        choice = "auto" if tools else "none"
    if not tools:
        if choice not in ("none", "auto"):
            raise InvalidRequest("tool_choice needs tools.", param="tool_choice")
        return ToolPlan(mode="none")
    functions = [_function(tool, index, model) for index, tool in enumerate(tools)]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools.", param="tool_choice")
        mode = "required"
    else:
        mode = choice
    if mode == "none":
        return ToolPlan(mode="none")
    schema = _call_schema(functions)
    _check(schema, "tools", model)
    return ToolPlan(mode=mode, functions=functions, schema=schema)


def _function(tool: dict[str, Any], index: int, model: str) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if parameters.get("type", "object") != "object":
        # Arguments are a JSON object (OpenAI's rule too); anything else could not be read back as a call.
        raise InvalidRequest("A function's parameters must be an object schema (\"type\": \"object\").",
                             param=f"tools[{index}].function.parameters.type")
    _check(parameters, f"tools[{index}].function.parameters", model)
    listed: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        listed["description"] = function["description"]
    listed["parameters"] = parameters
    return listed


def _check(schema: dict[str, Any], param: str, model: str) -> None:
    errors = [(path, message) for path, message, warning in schema_problems(schema, "llamacpp") if not warning]
    if errors:
        path, message = errors[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
        raise InvalidRequest(f"The tool schema cannot be used with model '{model}': {message}.",
                             param=f"{param}{where}")


def _call_schema(functions: list[dict[str, Any]]) -> dict[str, Any]:
    """One call of any of ``functions`` as a JSON Schema; parameters' ``$defs`` move to the root
    (their ``$ref``s point there), a name defined twice differently is a 400."""
    defs: dict[str, Any] = {}
    options = []
    for index, function in enumerate(functions):
        parameters = dict(function["parameters"])
        for key in _DEFS:
            for name, sub in (parameters.pop(key, None) or {}).items():
                if defs.get(f"{key}/{name}", sub) != sub:
                    raise InvalidRequest(f"Two tools define '{key}/{name}' differently.",
                                         param=f"tools[{index}].function.parameters.{key}")
                defs[f"{key}/{name}"] = sub
        options.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    for key in _DEFS:
        found = {name.split("/", 1)[1]: sub for name, sub in defs.items() if name.startswith(f"{key}/")}
        if found:
            schema = {**schema, key: found}
    return schema


# -- the conversation as the model sees it --------------------------------------------------------

def model_messages(messages: list[dict[str, Any]], tool_plan: ToolPlan, text: Any) -> list[dict[str, Any]]:
    """The chat messages for llama.cpp: the tool prompt, calls as JSON, results as user turns.

    ``text`` turns a message's content into a string (400 for non-text parts)."""
    calls: dict[str, str] = {}  # id → function name, of the calls made so far
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = "system" if message["role"] == "developer" else message["role"]
        content = text(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            shown = []
            for number, call in enumerate(message["tool_calls"]):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(call.get("id"), str) \
                        or not isinstance(function.get("name"), str):
                    raise InvalidRequest("A tool call needs an id and a function name.",
                                         param=f"messages[{index}].tool_calls[{number}]")
                calls[call["id"]] = function["name"]
                try:
                    arguments = json.loads(function.get("arguments") or "{}")
                except (TypeError, ValueError):
                    raise InvalidRequest("Tool call arguments must be a JSON string.",
                                         param=f"messages[{index}].tool_calls[{number}].function.arguments") from None
                shown.append(json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False))
            content = "\n".join(filter(None, [content, *shown]))
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in calls:
                raise InvalidRequest("A tool message must answer a tool call of an earlier assistant message "
                                     "(tool_call_id).", param=f"messages[{index}].tool_call_id")
            role, content = "user", f"Result of {calls[call_id]} (call {call_id}):\n{content}"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_results"):
                out[-1]["content"] += "\n\n" + content  # results of parallel calls: one user turn
                continue
            out.append({"role": role, "content": content, "tool_results": True})
            continue
        out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_results", None)
    if tool_plan.calls:
        prompt = tool_plan.system_prompt()
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# -- reading the answer back ----------------------------------------------------------------------

def read_call(text: str, tool_plan: ToolPlan) -> dict[str, Any] | None:
    """The ``tool_calls`` entry ``text`` is, or None if it is text (or a call cut off by max_tokens)."""
    if not tool_plan.calls or not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    names = {f["name"] for f in tool_plan.functions}
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments"), dict):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


def as_tool_call(choice: dict[str, Any], tool_plan: ToolPlan) -> dict[str, Any]:
    """A ``chat.completion`` choice whose text is a call, rewritten as OpenAI's tool-call choice."""
    message = choice.get("message") or {}
    call = read_call(message.get("content") or "", tool_plan)
    if call is None:
        return choice
    return {**choice, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
            "finish_reason": "tool_calls"}


class CallStream:
    """Turns one choice's streamed text into OpenAI deltas: text as ``content``, a call as
    ``tool_calls`` deltas (the id and name first, then the arguments in pieces).

    Text is held back until its first non-blank character says which it is; a call's closing
    brace (and trailing blanks) are held until the end, so the arguments relayed are exactly the
    arguments object."""

    def __init__(self, tool_plan: ToolPlan) -> None:
        self.plan = tool_plan
        self.kind = "text" if not tool_plan.calls else None  # None: not known yet
        self.buffer = ""
        self.sent = 0  # characters of the arguments relayed
        self.head_end: int | None = None

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Deltas for the next piece of generated text."""
        if self.kind == "text":
            return [{"content": text}] if text else []
        self.buffer += text
        if self.kind is None:
            stripped = self.buffer.lstrip()
            if not stripped:
                return []
            if not stripped.startswith("{"):
                self.kind = "text"
                return [{"content": self.buffer}]
            self.kind = "call"
        return self._call_deltas(final=False)

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the choice's finish reason."""
        if self.kind is None:
            self.kind = "text"
            return ([{"content": self.buffer}] if self.buffer else []), finish_reason
        if self.kind == "text":
            return [], finish_reason
        deltas = self._call_deltas(final=True)
        complete = read_call(self.buffer, self.plan) is not None
        return deltas, "tool_calls" if complete else finish_reason

    def _call_deltas(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self.head_end is None:
            head = _CALL_HEAD.match(self.buffer)
            if head is None:
                return []
            self.head_end = head.end()
            deltas.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function",
                                           "function": {"name": json.loads(f'"{head.group(1)}"'), "arguments": ""}}]})
        rest = self.buffer[self.head_end:]
        # Everything before the trailing '}' and blanks is surely the arguments; at the end, the one
        # trailing '}' is the call's own.
        end = _TRAILER.search(rest)
        upto = end.start() if end is not None else len(rest)
        if final:
            upto = end.start() if end is not None and end.group(1) else len(rest.rstrip())
        piece = rest[self.sent:upto]
        if piece:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            self.sent = upto
        return deltas
