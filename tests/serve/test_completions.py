"""/v1/completions (legacy text completion), through the official client, on the real app."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.fixtures import ServeApp

pytestmark = pytest.mark.serve


def test_embedded_model_completes_a_prompt(app: ServeApp) -> None:
    reply = app.client().completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8)
    assert reply.object == "text_completion" and reply.model == "smollm2"
    assert len(reply.choices) == 1 and reply.choices[0].text.strip()
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0


def test_echo_and_list_prompts_on_the_embedded_model(app: ServeApp) -> None:
    reply = app.client().completions.create(model="smollm2", prompt=["One, two,", "Red, green,"], max_tokens=4,
                                            echo=True, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].text.startswith("One, two,") and reply.choices[1].text.startswith("Red, green,")


def test_stop_ends_the_text(app: ServeApp) -> None:
    free = app.client().completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    stop = free.choices[0].text.strip()[:1]
    assert stop
    stopped = app.client().completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=12,
                                              temperature=0, stop=[stop])
    assert stop not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_stream_from_the_embedded_model_in_order(app: ServeApp) -> None:
    stream = app.client().completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8,
                                             stream=True, stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    whole = app.client().completions.create(model="smollm2", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert text == whole.choices[0].text  # the same text, in order
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("stop", "length")


def test_stream_wire_format_ends_with_done(app: ServeApp) -> None:
    body = {"model": "smollm2", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{app.base_url}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_upstream_completions_are_forwarded(app: ServeApp) -> None:
    reply = app.client().completions.create(model="fake", prompt=["a b", "c"], max_tokens=5, suffix="!")
    assert [c.text for c in reply.choices] == ["echo: a b", "echo: c"] and reply.model == "fake"
    assert reply.usage is not None and reply.usage.prompt_tokens == 3


def test_async_stream_from_the_upstream_keeps_each_prompts_order(app: ServeApp) -> None:
    async def go() -> dict[int, str]:
        async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = await client.completions.create(model="fake", prompt=["first prompt", "second"], stream=True)
            texts: dict[int, str] = {}
            async for chunk in stream:
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + choice.text
            return texts

    assert asyncio.run(go()) == {0: "echo: first prompt", 1: "echo: second"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"suffix": "!"}, "suffix"),
        ({"logprobs": 2, "echo": True}, "logprobs"),  # no logits of the prompt are kept
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"50": 5}}, "logit_bias"),
        ({"top_k": 5}, "top_k"),  # unknown to OpenAI's API: a local model refuses it, never drops it
        ({"max_tokens": 4000}, "max_tokens"),  # above smollm2's output limit
        ({"max_tokens": True}, "max_tokens"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"echo": "yes"}, "echo"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "word " * 3000}, "prompt"),  # does not fit the context
    ],
)
def test_what_the_local_model_cannot_honour_is_a_400_naming_it(
    app: ServeApp, body: dict[str, object], param: str
) -> None:
    for stream in (False, True):
        if "stream_options" in body and stream:
            continue
        response = httpx.post(f"{app.base_url}/completions",
                              json={"model": "smollm2", "prompt": "Hi", "max_tokens": 4, **body, "stream": stream},
                              timeout=120)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param


def test_the_openai_client_raises_bad_request_naming_suffix(app: ServeApp) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        app.client().completions.create(model="smollm2", prompt="Hi", suffix="there")
    assert refused.value.param == "suffix"
