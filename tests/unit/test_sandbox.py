"""The bounded template sandbox: hostile templates stop at their budgets (time, output, work) with an
error naming the limit; ordinary templates render exactly as Jinja renders them; servers render off
their event loop; push checks render examples (or a sample input) in the same sandbox."""

from __future__ import annotations

import asyncio
import os
import pickle
import resource
import threading
import time
from typing import Any

import pytest
from jinja2.sandbox import SandboxedEnvironment

from deployments.core import taskfile
from deployments.core.prompting import RENDER_NICENESS, TemplateRenderer, render_messages, render_template
from deployments.core.sandbox import MAX_INT_BITS, RenderLimitExceeded, RenderLimits
from deployments.core.taskdefs import TaskDefinition
from deployments.core.taskfile import check_sources, check_text, sample_input
from deployments.errors import TemplateFailed

SMALL = RenderLimits(timeout_s=0.3, max_chars=100_000)
ROOMY = RenderLimits(timeout_s=60, max_chars=100_000)  # for renders that must succeed on a loaded machine
BIG = "y" * 10_000

# Each would stall a process for seconds or grow it by gigabytes in Jinja's plain sandbox.
HOSTILE: dict[str, tuple[str, dict[str, Any], str]] = {
    "string repetition": ("{{ 'x' * 10**9 }}", {}, "render_max_chars"),
    "list repetition": ("{{ ([0] * 10**9)|length }}", {}, "render_max_chars"),
    "input repetition": ("{{ text * 1000000 }}", {"text": BIG}, "render_max_chars"),
    "huge power": ("{{ 7 ** 10000000 }}", {}, "render_max_chars"),
    "center filter": ("{{ 'x'|center(10**9) }}", {}, "render_max_chars"),
    "ljust method": ("{{ 'x'.ljust(10**9) }}", {}, "render_max_chars"),
    "format width": ("{{ '{:>999999999}'.format(1) }}", {}, "render_max_chars"),
    "printf width": ("{{ '%999999999d' % 1 }}", {}, "render_max_chars"),
    "printf star": ("{{ '%*d' % (999999999, 1) }}", {}, "render_max_chars"),
    "format filter": ("{{ '%999999999s'|format('a') }}", {}, "render_max_chars"),
    "lipsum": ("{{ lipsum(1000000) }}", {}, "render_max_chars"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}", {}, "render_max_chars"),
    "doubling with +": ("{% set ns = namespace(s=[1]) %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s|length }}", {}, "render_max_chars"),
    "list.extend doubling": ("{% set l = [1] %}{% for i in range(60) %}{{ l.extend(l) or '' }}{% endfor %}", {},
                             "render_max_chars"),
    "set block in a loop": ("{% set x %}{% for i in range(100000) %}{{ big }}{% endfor %}{% endset %}{{ x|length }}",
                            {"big": BIG}, "render_max_chars"),
    "replace blow-up": ("{{ big|replace('y', big) }}", {"big": BIG}, "render_max_chars"),
    "str.replace blow-up": ("{{ big.replace('y', big) }}", {"big": BIG}, "render_max_chars"),
    "join blow-up": ("{{ range(100000)|join(big) }}", {"big": BIG}, "render_max_chars"),
    "str.join blow-up": ("{{ big.join(range(1000)|map('string')) }}", {"big": BIG}, "render_max_chars"),
    "indent blow-up": ("{{ big|wordwrap(1)|indent(100000) }}", {"big": BIG}, "render_max_chars"),
    "slice fill": ("{{ [1]|slice(10**9)|list|length }}", {}, "render_max_chars"),
    "batch fill": ("{{ [1]|batch(10**9, 0)|list|length }}", {}, "render_max_chars"),
    "sum of lists": ("{{ (range(5000)|map('string')|map('list')|list)|sum(start=[])|length }}", {},
                     "render_max_chars"),
    "output size": ("{% for i in range(100000) %}{{ big }}{% endfor %}", {"big": BIG}, "render_max_chars"),
    "nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", {},
                     "render_timeout_s"),
    "nested loops over the input": ("{% for a in items %}{% for b in items %}{% if a == b %}{% endif %}{% endfor %}"
                                    "{% endfor %}", {"items": list(range(20_000))}, "render_timeout_s"),
    "sort of a huge list": ("{{ items|sort|first }}", {"items": list(range(200_000))}, "max_filter_items"),
    "unique of a long string": ("{{ text|unique|list|length }}", {"text": "ab" * 100_000}, "max_filter_items"),
    "pprint of a huge list": ("{{ items|pprint|length }}", {"items": list(range(200_000))}, "max_filter_items"),
    "urlize of a long text": ("{{ text|urlize|length }}",  # a second of regular expressions per megabyte
                              {"text": "see http://example.com/x and www.example.org " * 100_000}, "render_timeout_s"),
    "exponential macro": ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(40) }}",
                          {}, "render_timeout_s"),
}


@pytest.mark.parametrize("source, variables, limit", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_template_stops_at_its_budget_naming_the_limit(source: str, variables: dict[str, Any],
                                                                 limit: str) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RenderLimitExceeded) as info:  # a size limit must trip long before a roomy deadline
        render_template(source, variables, SMALL if limit == "render_timeout_s" else ROOMY)
    message = info.value.message
    assert info.value.limit == limit, message
    assert f"tasks.{limit}" in message or "bits" in message or "at most 100,000 items" in message, message
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, grown_mb  # bounded by the work budget, not by what the template asked for


def test_urlize_in_pieces_gives_what_jinja_gives() -> None:
    words = ["http://a.b/c", "www.x.org", "mail@x.io", "(http://q.r/s).", "plain", "text\n", "  ", "<b>",
             "https://z.z/?a=1&b=2,"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(5000))  # ~55 KB: many 4 KB pieces
    plain = SandboxedEnvironment().from_string("{{ t|urlize }}").render(t=text)
    assert render_template("{{ t|urlize }}", {"t": text}, RenderLimits(timeout_s=30, max_chars=1_000_000)) == plain


def test_integers_are_capped_in_bits() -> None:
    assert render_template("{{ (2 ** 1000)|string|length }}", {}, ROOMY) == "302"
    with pytest.raises(RenderLimitExceeded, match=f"{MAX_INT_BITS:,} bits"):
        render_template("{{ 3 ** 100000 }}", {}, SMALL)
    with pytest.raises(RenderLimitExceeded):
        render_template("{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                        "{% endfor %}", {}, SMALL)


NAMED = [{"name": "a"}, {"name": "b"}]
ORDINARY = [
    ("Hello {{ name }}!", {"name": "Ada"}),
    ("{% for i in items %}{{ loop.index }}. {{ i.name|upper }}\n{% endfor %}", {"items": NAMED}),
    ("{{ items|map(attribute='name')|join(', ') }} {{ items|length }}", {"items": NAMED}),
    ("{{ 'ab' * 3 }} {{ [1, 2] + [3] }} {{ 2 ** 10 }} {{ 7 % 3 }} {{ '%05.1f' % 3.14159 }} {{ '{:>6}'.format('x') }}",
     {}),
    ("{{ name ~ '!' ~ 1 }} {{ name|center(9) }}|{{ 'a\nb'|indent(2, first=true) }}", {"name": "Ada"}),
    ("{{ text|replace('a', 'o') }} {{ text|truncate(9) }} {{ text|wordwrap(5) }} {{ text|wordcount }}",
     {"text": "a banana and an apple"}),
    ("{% set ns = namespace(total=0) %}{% for n in range(10) %}{% set ns.total = ns.total + n %}{% endfor %}"
     "{{ ns.total }} {{ range(5)|sum }} {{ [[1], [2]]|sum(start=[]) }} {{ range(7)|batch(3)|list }}"
     " {{ range(7)|slice(3)|list }}", {}),
    ("{% macro item(x) %}<{{ x }}>{% endmacro %}{% for x in 'abc' %}{{ item(x) }}{% endfor %}"
     "{% set block %}in {{ 'a set block' }}{% endset %} {{ block }} {{ lipsum(1, false, 5, 6)|wordcount }}", {}),
    ("{{ data|tojson }} {{ data|dictsort }} {{ data.items()|list }} {{ 'x,y'.split(',') }}",
     {"data": {"b": 1, "a": 2}}),
]


@pytest.mark.parametrize("source, variables", ORDINARY)
def test_ordinary_templates_render_as_plain_jinja_renders_them(source: str, variables: dict[str, Any]) -> None:
    plain = SandboxedEnvironment().from_string(source).render(variables)
    if "lipsum" not in source:
        assert render_template(source, variables, ROOMY) == plain
    else:
        assert render_template(source, variables, ROOMY).split("in a set block")[0] == plain.split("in a set block")[0]


def test_an_input_just_under_the_output_budget_renders_and_one_over_is_refused() -> None:
    limits = RenderLimits(timeout_s=5, max_chars=200_000)
    text = "z" * 199_990
    assert len(render_template("Text: {{ text }}", {"text": text}, limits)) == 199_996
    with pytest.raises(RenderLimitExceeded, match="longer than 200,000 characters"):
        render_template("Text: {{ text }}{{ text }}", {"text": text}, limits)


def task(prompt: str, system: str | None = None, **schema: Any) -> TaskDefinition:
    return TaskDefinition.model_validate({
        "name": "t", "description": "T.", "model": "m", "prompt": prompt, "system": system,
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}, **schema}},
        "output_schema": {"type": "object"},
    })


def test_render_messages_over_budget_is_a_422_template_error_naming_the_limit() -> None:
    with pytest.raises(TemplateFailed) as info:
        render_messages(task("{{ text * 100000000 }}"), {"text": "ab"}, SMALL)
    assert info.value.status_code == 422 and info.value.code == "template_error"
    assert "tasks.render_max_chars" in info.value.message
    # One budget for the system and the user template together: the system message spends it.
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateFailed, match=r"time budget of 0\.3s \(tasks\.render_timeout_s\)"):
        render_messages(task("{{ text }}", system=slow), {"text": "ab"}, SMALL)
    assert render_messages(task("Say {{ text }}", system="Be brief."), {"text": "hi"}, ROOMY) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}
    ]


def test_the_limit_error_survives_pickle() -> None:
    error = RenderLimitExceeded("render_timeout_s", "too slow")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.limit, copy.message) == ("render_timeout_s", "too slow")


def test_the_renderer_renders_in_a_worker_thread_while_the_loop_runs_on() -> None:
    """A render that runs out its whole time budget does not hold the event loop: a coroutine started
    after it finishes first, and many loop iterations happen meanwhile."""
    slow = task("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}")
    renderer = TemplateRenderer(RenderLimits(timeout_s=0.5, max_chars=1000))
    roomy = TemplateRenderer(ROOMY)
    order: list[str] = []

    async def other() -> int:
        ticks = 0
        while not order:
            await asyncio.sleep(0.001)
            ticks += 1
        return ticks

    async def hostile() -> None:
        with pytest.raises(TemplateFailed, match="render_timeout_s"):
            await renderer.render(slow, {"text": "x"})
        order.append("hostile")

    async def main() -> int:
        watcher = asyncio.create_task(other())
        await hostile()
        return await watcher

    loop_ticks = asyncio.run(main())
    assert loop_ticks > 10, loop_ticks  # the loop kept turning while the render ran out its budget
    thread_names: list[str] = []
    niceness: list[int] = []

    async def ordinary() -> list[dict[str, str]]:
        return await roomy.render(task("{{ text }}{{ name() }}"), {"text": "ok", "name": record_thread})

    def record_thread() -> str:
        thread_names.append(threading.current_thread().name)
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return "!"

    assert asyncio.run(ordinary()) == [{"role": "user", "content": "ok!"}]
    assert thread_names[0].startswith("promptfleet-render")
    assert niceness[0] >= RENDER_NICENESS  # a long render gives way to the event loops on a busy machine


# -- the push check renders in the same sandbox --------------------------------------------------

FILE = """\
name: t
description: T.
model: m
input_schema:
  type: object
  properties:
    text: {{type: string, minLength: 2}}
    n: {{type: integer, minimum: 3}}
  required: [text]
output_schema: {{type: object}}
prompt: {prompt!r}
{examples}"""


def check(prompt: str, examples: str = "", limits: RenderLimits = SMALL) -> list[str]:
    return [str(p) for p in check_text(FILE.format(prompt=prompt, examples=examples), "t.yaml", stem="t",
                                       limits=limits).errors]


def test_a_template_that_can_never_render_is_refused_at_check_naming_file_and_field() -> None:
    problems = check("{{ text * 10**9 }}")
    assert len(problems) == 1 and problems[0].startswith("t.yaml:") and "prompt:" in problems[0]
    assert "sample input made from input_schema" in problems[0] and "tasks.render_max_chars" in problems[0]
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{{ text[:0] }}{% endfor %}{% endfor %}"
    assert "tasks.render_timeout_s" in check(slow)[0]
    assert "ZeroDivisionError" in check("{{ text }} {{ 1 / 0 }}")[0]


def test_examples_are_rendered_instead_of_a_sample_when_given() -> None:
    examples = "examples:\n  - name: long\n    input: {text: " + "a" * 50 + "}\n    expect: {}\n"
    problems = check("{{ text * 10000 }}", examples)
    assert len(problems) == 1 and "example 'long'" in problems[0] and "sample" not in problems[0]
    # The same template with a short example input renders within the budget: accepted.
    assert check("{{ text * 10000 }}", examples.replace("a" * 50, "ab"), ROOMY) == []


def test_ordinary_templates_pass_the_render_check() -> None:
    assert check("Label {{ text }} ({{ n | default(1) }} times){% for c in text %}.{% endfor %}", limits=ROOMY) == []


@pytest.mark.parametrize("schema, expected", [
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 3},
                                       "i": {"type": "integer", "minimum": 4}, "e": {"enum": ["x", "y"]},
                                       "a": {"type": "array", "items": {"type": "boolean"}}}},
     {"s": "xxx", "i": 5, "e": "x", "a": [True]}),
    ({"type": "object", "properties": {"d": {"type": "string", "format": "date"}, "o": {"type": ["null", "number"]}}},
     {"d": "2024-01-31", "o": 1.0}),
    ({"type": "object", "properties": {"p": {"type": "string", "pattern": "^[0-9]+$"}}}, None),  # not found simply
])
def test_sample_input(schema: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert sample_input(schema) == expected


def test_the_render_checks_of_one_push_have_a_total_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many slow templates in one push cannot hold a Gateway thread for many render timeouts."""
    monkeypatch.setattr(taskfile, "RENDER_CHECK_MIN_S", 0.5)
    slow = "{% for a in range(100000) %}{% for b in range(100000) %}{{ text[:0] }}{% endfor %}{% endfor %}"
    files = [(f"t{i}.yaml", FILE.format(prompt=slow, examples="").replace("name: t", f"name: t{i}")) for i in range(6)]
    started = time.monotonic()
    checked = check_sources(files, limits=SMALL)
    assert time.monotonic() - started < 6 * SMALL.timeout_s  # not one full timeout per file
    messages = [p.message for c in checked for p in c.errors]
    assert len(messages) == 6 and "tasks.render_timeout_s" in messages[0]
    assert any("took longer than 1.2s in total" in m for m in messages)
    ordinary = [("t.yaml", FILE.format(prompt="{{ text }}", examples=""))]
    assert [c.problems for c in check_sources(ordinary, limits=ROOMY)] == [[]]
