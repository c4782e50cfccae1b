"""The embedded model's batched decoder and its logprobs (issues 21 and 22), through the official
client on the real app: answers do not depend on what runs beside them, logprobs have OpenAI's
shape and sane values, a client that hangs up frees its slot, and grammars hold under batching."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures import ServeApp
from tests.serve.test_tools import WEATHER, WEATHER_PARAMS, arguments_of

pytestmark = pytest.mark.serve

QUESTIONS = ["What is 2+2?", "Name three colours.", "Write a haiku about the sea.", "List five prime numbers.",
             "What is the capital of Japan?", "Tell me about cats.", "Say hello in French.",
             "Explain rain in one sentence."]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"}}, "required": ["name", "age"]}


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


async def eight(app: ServeApp, bodies: list[dict[str, Any]]) -> list[Any]:
    """The bodies' chat completions, all sent at once."""
    async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=300) as client:
        return list(await asyncio.gather(*(client.chat.completions.create(**body) for body in bodies)))


def test_eight_at_once_answer_as_each_alone(app: ServeApp) -> None:
    # The decoder shapes its batches so a token's sums do not depend on its neighbours
    # (deployments/providers/llamacpp_decode.py): greedy text and logprobs are equal bit for bit.
    bodies = [{"model": "smollm2", "messages": ask(q), "max_tokens": 24, "temperature": 0, "logprobs": True}
              for q in QUESTIONS]
    alone = [app.client().chat.completions.create(**body) for body in bodies]
    together = asyncio.run(eight(app, bodies))
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert len({r.choices[0].message.content for r in alone}) == len(QUESTIONS)  # each its own answer
    for a, b in zip(alone, together, strict=True):
        assert [t.logprob for t in a.choices[0].logprobs.content] == [t.logprob for t in b.choices[0].logprobs.content]
        assert a.usage == b.usage


def test_logprobs_shape_and_values(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(model="smollm2", messages=ask(QUESTIONS[0]), max_tokens=12,
                                                 temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert content and len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert bytes(token.bytes).decode("utf-8", errors="replace") == token.token
        assert len(token.top_logprobs) == 5 and token.logprob <= 0
        assert sum(math.exp(t.logprob) for t in token.top_logprobs) <= 1 + 1e-9
        ranked = [t.logprob for t in token.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert (token.top_logprobs[0].token, token.top_logprobs[0].logprob) == (token.token, token.logprob)
    plain = app.client().chat.completions.create(model="smollm2", messages=ask(QUESTIONS[0]), max_tokens=12,
                                                 temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    bare = app.client().chat.completions.create(model="smollm2", messages=ask(QUESTIONS[0]), max_tokens=4,
                                                temperature=0, logprobs=True)
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)


def test_streamed_logprobs_match_the_json_ones(app: ServeApp) -> None:
    body: dict[str, Any] = {"model": "smollm2", "messages": ask(QUESTIONS[1]), "max_tokens": 16, "temperature": 0,
                            "logprobs": True, "top_logprobs": 2}
    whole = app.client().chat.completions.create(**body)
    chunks = list(app.client().chat.completions.create(**body, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in whole.choices[0].logprobs.content]


def test_completion_logprobs_in_the_legacy_shape(app: ServeApp) -> None:
    reply = app.client().completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6, temperature=0,
                                            logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == logprob == top[token]


@pytest.mark.parametrize(("body", "param"), [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
])
def test_refused_logprob_fields_name_themselves(app: ServeApp, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        app.client().chat.completions.create(model="smollm2", messages=ask("hi"), max_tokens=4, **body)
    assert refused.value.status_code == 400 and refused.value.body["param"] == param  # type: ignore[index]


def test_completion_logprobs_with_echo_are_refused(app: ServeApp) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        app.client().completions.create(model="smollm2", prompt="Hi", max_tokens=4, logprobs=2, echo=True)
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
    assert app.client().completions.create(model="smollm2", prompt="Hi", max_tokens=4, echo=True).choices


def test_a_client_that_hangs_up_frees_its_slot(app: ServeApp) -> None:
    # Eight streams that would run to the model's output limit fill every slot; the clients hang up
    # after their first token. Were the slots kept, the eight requests after them would wait for
    # 8 × 2,000 tokens (minutes on this machine) and hit the client's timeout.
    body = {"model": "smollm2", "messages": ask("Count from one to ten thousand."), "max_tokens": 2000,
            "temperature": 0.9, "stream": True}

    async def hang_up() -> None:
        async with httpx.AsyncClient(timeout=300) as client, \
                client.stream("POST", f"{app.base_url}/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if '"content":' in line and '"content":""' not in line:
                    return  # leaves the stream: the connection closes

    async def hang_up_all() -> None:
        await asyncio.gather(*(hang_up() for _ in range(8)))

    asyncio.run(hang_up_all())
    after = asyncio.run(eight(app, [{"model": "smollm2", "messages": ask(q), "max_tokens": 8, "timeout": 90}
                                    for q in QUESTIONS]))
    assert all(r.choices[0].message.content for r in after)


def test_tool_calls_and_json_schema_hold_under_batching(app: ServeApp) -> None:
    tools = [{"model": "smollm2", "messages": ask(f"What is the weather in {city}?"), "tools": [WEATHER],
              "tool_choice": "required", "max_tokens": 60} for city in ("Paris", "Oslo", "Lima", "Rome")]
    json_bodies = [{"model": "smollm2", "messages": ask(f"Invent a person called {name}."), "max_tokens": 60,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
                   for name in ("Ann", "Bo", "Cy", "Di")]
    replies = asyncio.run(eight(app, tools + json_bodies))
    for reply in replies[:4]:
        assert reply.choices[0].finish_reason == "tool_calls"
        arguments_of(reply, WEATHER_PARAMS)
    for reply in replies[4:]:
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
