"""The bounded Jinja2 sandbox task templates render in: every render has a time and a size budget.

Pure logic, used by ``deployments.core.prompting`` (and through it by the Gateway, the TaskRunner, the
push checks and the CLI). Owns no state; the budget of the render in progress lives in
``deployments.core.render_budget``.

Jinja's ``SandboxedEnvironment`` keeps templates away from Python internals, but it bounds only
``range``: ``'x' * 10**9``, ``[0] * 10**9``, ``'x'|center(10**9)``, ``lipsum(10**6)``, nested loops
over a large input, or a string doubled in a loop each stall the process and grow it by gigabytes.
A Python thread cannot be stopped from outside, so the sandbox stops itself. Every render carries a
``Budget``:

* **time** — a deadline checked every few dozen steps; a step is a loop iteration, a call, an
  intercepted operator, a filter or an output (the compiled template is rewritten so every ``for``
  iterates through a counting wrapper and every output and ``~`` passes a counting filter);
* **output** — the characters the render returns (``RenderLimits.max_chars``);
* **work** — the characters (8 per list or dict item) all operations of the render may produce in
  total, ``WORK_FACTOR`` × ``max_chars``. Operations whose result can be far larger than their
  operands (``*``, ``**``, ``%``, ``str.format`` widths, ``center``/``ljust``/…, ``replace``, ``join``,
  ``indent``, ``batch``/``slice`` fills, ``lipsum``) are checked *before* they run, so no single C-level
  call ever allocates past the budget; the rest are charged after.

Integers are capped at ``MAX_INT_BITS`` (``2 ** 10**9`` is refused before it is computed). A render
over budget raises ``RenderLimitExceeded`` naming the limit; the caller turns it into a 422.

Between checks the render also releases the GIL now and then (``time.sleep(0)``), so a render in a
worker thread cannot hold the event loop of its process off for more than about a millisecond at a
time.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Callable, Iterable, Iterator, Sized
from functools import update_wrapper, wraps
from typing import Any

from jinja2 import Template, nodes, pass_environment, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.filters import FILTERS, make_attrgetter, sync_do_slice
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment, SandboxedFormatter
from jinja2.utils import generate_lorem_ipsum
from jinja2.visitor import NodeTransformer

from deployments.core.render_budget import (
    CHECK_EVERY,
    DEFAULT_LIMITS,
    ITEM_CHARS,
    MAX_INT_BITS,
    WORK_FACTOR,
    Budget,
    RenderLimitExceeded,
    RenderLimits,
    active,
    budget_for,
    size,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_INT_BITS",
    "WORK_FACTOR",
    "BoundedEnvironment",
    "RenderLimitExceeded",
    "RenderLimits",
    "budget_for",
]


def _int_bits(value: Any) -> int:
    return value.bit_length() if isinstance(value, int) else 0


# -- operators --------------------------------------------------------------------------------

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")


def _check_printf(budget: Budget, template: str | bytes, args: Any) -> None:
    """``'%999999999d' % 1`` or ``'%*d' % (10**9, 1)``: refuse widths the budget cannot hold."""
    text = template.decode("latin-1") if isinstance(template, bytes) else template
    star = False
    for width, precision in _PRINTF_SPEC.findall(text):
        for number in (width, precision):
            if number == "*":
                star = True
            elif number:
                budget.need(int(number))
    if star:
        values = args if isinstance(args, tuple) else (args,)
        for value in values:
            if isinstance(value, int):
                budget.need(abs(value))


def _binop(budget: Budget, op: str, left: Any, right: Any) -> None:
    """Check, before it runs, an operator whose result could outgrow its operands."""
    if op == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, Sized) and not isinstance(seq, dict) and isinstance(times, int):
                budget.need(max(size(seq), 1) * max(times, 0))
        if isinstance(left, int) and isinstance(right, int) and _int_bits(left) + _int_bits(right) > MAX_INT_BITS:
            raise _too_big()
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if right * math.log2(abs(left)) > MAX_INT_BITS:
                raise _too_big()
    elif op == "+":
        if isinstance(left, Sized) and isinstance(right, Sized):
            budget.need(size(left) + size(right))
    elif op == "%" and isinstance(left, str | bytes):
        _check_printf(budget, left, right)


def _too_big() -> RenderLimitExceeded:
    return RenderLimitExceeded(
        "render_max_chars", f"the template computes an integer of more than {MAX_INT_BITS:,} bits"
    )


# -- calls: str and list methods ----------------------------------------------------------------

_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill"})
_GROWING_MUTATORS = frozenset({"extend", "update", "__iadd__"})


def _check_call(budget: Budget, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Check a call of a method that can produce far more than its receiver; returns the arguments
    to call it with (an iterable given to ``join`` is read once, here)."""
    if not isinstance(func, types.BuiltinMethodType | types.MethodType):
        return args
    owner, name = getattr(func, "__self__", None), func.__name__
    if isinstance(owner, str | bytes):
        arg = args[0] if args else None
        if name in _WIDTH_METHODS and isinstance(arg, int):
            budget.need(arg)
        elif name == "expandtabs":
            tabsize = arg if isinstance(arg, int) else kwargs.get("tabsize", 8)
            if isinstance(tabsize, int):
                budget.need(len(owner) * max(tabsize, 1))
        elif name == "replace" and len(args) >= 2 and isinstance(args[0], str | bytes):
            old, new = args[0], args[1]
            count = owner.count(old) if old else len(owner) + 1  # type: ignore[arg-type]  # a str's or bytes' own
            if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                count = min(count, args[2])
            budget.need(len(owner) + count * size(new))
        elif name == "join" and args:
            items = list(_counted(budget, args[0]))
            budget.need(sum(size(item) for item in items) + len(owner) * len(items))
            return (items, *args[1:])
        elif name == "translate" and isinstance(arg, dict):
            longest = max((size(v) for v in arg.values()), default=1)
            budget.need(len(owner) * max(longest, 1))
    elif isinstance(owner, list | dict | set) and name in _GROWING_MUTATORS and args:
        budget.charge(size(owner) + (size(args[0]) or ITEM_CHARS * 16))
    elif isinstance(owner, list) and name in {"append", "insert"}:
        budget.charge(ITEM_CHARS)
    return args


def _counted(budget: Budget, iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        budget.tick()
        yield item


class _BoundedFormatter(SandboxedFormatter):
    """``'{:>999999999}'.format(1)``: a width or precision is checked before the field is formatted."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        budget = active()
        for number in _NUMBER.findall(format_spec):
            budget.need(int(number))
        return budget.produced(super().format_field(value, format_spec))


# -- filters and globals ------------------------------------------------------------------------


def _center(value: Any, width: int = 80) -> str:
    active().need(width)
    return str(value).center(width)


def _indent(s: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    step = len(width) if isinstance(width, str) else width
    active().need(len(text) + (text.count("\n") + 2) * max(step, 0))
    return FILTERS["indent"](text, width, first, blank)  # type: ignore[no-any-return]


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    if args and kwargs:
        raise TypeError("can't handle positional and keyword arguments at the same time")
    text = str(value)
    values = kwargs or args
    _check_printf(active(), text, values)
    return text % values


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: int | None = None) -> str:
    text, old, new = str(s), str(old), str(new)
    occurrences = text.count(old) if old else len(text) + 1
    if count is not None:
        occurrences = min(occurrences, max(count, 0))
    active().need(len(text) + occurrences * len(new))
    return text.replace(old, new, -1 if count is None else count)


@pass_environment
def _join(environment: SandboxedEnvironment, value: Iterable[Any], d: Any = "", attribute: Any = None) -> str:
    budget = active()
    if attribute is not None:
        value = map(make_attrgetter(environment, attribute), value)
    sep = str(d)
    parts: list[str] = []
    total = 0
    for item in value:
        budget.tick()
        text = str(item)
        total += len(text) + len(sep)
        budget.need(total)
        parts.append(text)
    return sep.join(parts)


@pass_environment
def _sum(environment: BoundedEnvironment, iterable: Iterable[Any], attribute: Any = None, start: Any = 0) -> Any:
    # sum() of lists or strings copies the total at every step: step by step, each one checked.
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(None, "+", total, item)  # type: ignore[arg-type]
    return total


def _slice(value: Iterable[Any], slices: int, fill_with: Any = None) -> Iterator[list[Any]]:
    active().need(slices * ITEM_CHARS)
    return sync_do_slice(value, slices, fill_with)  # type: ignore[arg-type]


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Iterator[list[Any]]:
    if fill_with is not None:
        active().need(linecount * ITEM_CHARS)
    return FILTERS["batch"](value, linecount, fill_with)  # type: ignore[no-any-return]


@pass_environment
def _wordwrap(environment: SandboxedEnvironment, s: Any, width: int = 79, break_long_words: bool = True,
              wrapstring: str | None = None, break_on_hyphens: bool = True) -> str:
    text = str(s)
    active().need(len(text) * (1 + len(wrapstring or environment.newline_sequence)))
    return FILTERS["wordwrap"](environment, text, width, break_long_words, wrapstring,  # type: ignore[no-any-return]
                               break_on_hyphens)


_LIPSUM_MAX_WORDS = 100_000  # generate_lorem_ipsum is a Python loop with no checks inside


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    words = n * max
    active().need(words * 12)  # a word and its space, generously
    if words > _LIPSUM_MAX_WORDS:
        raise RenderLimitExceeded("render_max_chars", f"lipsum() is limited to {_LIPSUM_MAX_WORDS:,} words (n × max) "
                                  "whatever tasks.render_max_chars allows")
    return generate_lorem_ipsum(n, html, min, max)


def _iterate(value: Any) -> Iterator[Any]:
    """Every ``for`` of a template iterates through this (a step per item; the clock every few)."""
    budget = active()
    for count, item in enumerate(value, 1):
        if not count % CHECK_EVERY:  # inlined tick(): this is the innermost loop of a template
            budget.check_clock()
        yield item


def _output(value: Any) -> str:
    """Every output expression and text block passes this (also inside ``set`` blocks and macros,
    whose output is collected in memory rather than returned)."""
    text = str(value)
    budget = active()
    budget.tick()
    budget.charge(len(text))
    return text


def _concat(values: list[Any]) -> str:
    """``a ~ b``: the total length is checked before the strings are joined."""
    budget = active()
    parts = [str(v) for v in values]
    budget.need(sum(map(len, parts)))
    return budget.produced("".join(parts))  # type: ignore[no-any-return]


MAX_FILTER_ITEMS = 100_000
"""Most items (or characters, of a string) a filter that loops in Python over its input may take."""
# These loop over their input inside one call (a sort's key function, a pretty-printer, a generator the
# ``list`` filter drains in C), where no step is counted: capping the input bounds the call's time
# (100,000 items: tens of milliseconds), as Jinja caps ``range``.
_LOOPING_FILTERS = frozenset({
    "list", "sort", "unique", "groupby", "dictsort", "map", "select", "reject", "selectattr", "rejectattr",
    "min", "max", "batch", "slice", "pprint",
})


def _charging(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that charges what it returns (and, if it loops over its input, caps that input)."""
    value_at = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    looping = name in _LOOPING_FILTERS

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        budget = active()
        budget.tick()
        if looping and len(args) > value_at and isinstance(args[value_at], Sized):
            count = len(args[value_at])
            if count > MAX_FILTER_ITEMS:
                raise RenderLimitExceeded(
                    "max_filter_items", f"the filter '{name}' takes at most {MAX_FILTER_ITEMS:,} items, not {count:,}"
                )
        return budget.produced(func(*args, **kwargs))

    return wrapper


_WHITESPACE = re.compile(r"\s")
_URLIZE_CHUNK = 4096


@pass_eval_context
def _urlize(eval_ctx: EvalContext, value: Any, *args: Any, **kwargs: Any) -> str:
    """``urlize`` a piece at a time (cut at whitespace: it treats each word on its own, so the result is
    the same), with a step between pieces: on a megabyte it is a second of regular expressions."""
    budget = active()
    text = str(value)
    pieces: list[str] = []
    start = 0
    while start < len(text):
        end = start + _URLIZE_CHUNK
        if end < len(text):
            found = _WHITESPACE.search(text, end)
            end = found.start() if found else len(text)
        pieces.append(FILTERS["urlize"](eval_ctx, text[start:end], *args, **kwargs))
        budget.tick()
        budget.check_clock()
        start = end
    return budget.produced("".join(pieces))  # type: ignore[no-any-return]


_CHECKED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "format": _format,
    "replace": _replace,
    "join": _join,
    "sum": _sum,
    "slice": _slice,
    "batch": _batch,
    "wordwrap": _wordwrap,
    "urlize": _urlize,
}
_ITERATE, _OUTPUT, _CONCAT = "_pf_iterate", "_pf_output", "_pf_concat"


class _Bound(NodeTransformer):
    """Rewrites a parsed template so loops, outputs and ``~`` go through the counting filters."""

    @staticmethod
    def _filter(node: nodes.Node, name: str, lineno: int) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)  # changes ``node`` in place
        node.iter = self._filter(node.iter, _ITERATE, node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            self._filter(nodes.Const(child.data, lineno=child.lineno) if isinstance(child, nodes.TemplateData)
                         else child, _OUTPUT, child.lineno)
            for child in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, node.lineno)


class BoundedEnvironment(SandboxedEnvironment):
    """``SandboxedEnvironment`` whose renders stay within a ``RenderLimits`` budget.

    ``Template.render`` uses the budget of an enclosing ``budget_for`` block, else ``limits``."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *args: Any, limits: RenderLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.template_class = BoundedTemplate
        for name, func in self.filters.items():
            self.filters[name] = _CHECKED_FILTERS.get(name) or _charging(name, func)
        self.filters.update({_ITERATE: _iterate, _OUTPUT: _output, _CONCAT: _concat})
        self.globals["lipsum"] = _lipsum

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = _Bound().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree  # type: ignore[no-any-return]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = active()
        budget.tick()
        _binop(budget, operator, left, right)
        return budget.produced(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = active()
        budget.tick()
        if not __self.is_safe_callable(__obj):
            raise SecurityError(f"{__obj!r} is not safely callable")
        args = _check_call(budget, __obj, args, kwargs)
        return budget.produced(__context.call(__obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in (
            "format", "format_map"
        ):
            return None
        f_self = value.__self__
        if not isinstance(f_self, str):
            return None
        is_format_map = value.__name__ == "format_map"
        formatter = _BoundedFormatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return str(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)


class BoundedTemplate(Template):
    """A template whose ``render`` is bounded (``generate`` and ``stream`` are not offered)."""

    environment: BoundedEnvironment

    def render(self, *args: Any, **kwargs: Any) -> str:
        with budget_for(self.environment.limits) as budget:
            ctx = self.new_context(dict(*args, **kwargs))
            try:
                return budget.collect(self.root_render_func(ctx))
            except Exception:
                self.environment.handle_exception()

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        raise TypeError("bounded templates render whole: use render()")

