"""The OpenAI-compatible surface, through the official client, on the real app."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures import ServeApp

pytestmark = pytest.mark.serve

HELLO = [{"role": "user", "content": "Say hello in three words."}]


def test_completion_from_embedded_model(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(model="smollm2", messages=HELLO, max_tokens=16)
    assert reply.object == "chat.completion"
    assert reply.model == "smollm2"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content and reply.choices[0].message.content.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_from_embedded_model(app: ServeApp) -> None:
    stream = app.client().chat.completions.create(
        model="smollm2",
        messages=HELLO,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert chunks[-1].usage.prompt_tokens > 0


def test_stream_wire_format_ends_with_done(app: ServeApp) -> None:
    body = {"model": "smollm2", "messages": HELLO, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{app.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_json_schema_output_from_embedded_model(app: ServeApp) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    reply = app.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a big city and its country as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        max_tokens=64,
    )
    jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)


def test_json_object_output_from_embedded_model(app: ServeApp) -> None:
    reply = app.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Reply with a JSON object with the keys name and age of a cat."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    # A grammar guarantees JSON only if generation is not cut off by max_tokens.
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_models_list(app: ServeApp) -> None:
    models = {m.id: m for m in app.client().models.list()}
    assert {"smollm2", "fake", "fake-retry", "fake-short"} <= set(models)
    assert models["smollm2"].owned_by == "promptfleet:llamacpp"
    assert app.client().models.retrieve("fake").id == "fake"


def test_unknown_model_is_not_found(app: ServeApp) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        app.client().chat.completions.create(model="no-such-model", messages=HELLO)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and error["param"] == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake"}, "messages"),
        ({"messages": HELLO}, "model"),
        ({"model": "fake", "messages": []}, "messages"),
        ({"model": "fake", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"model": "fake", "messages": HELLO, "temperature": 7}, "temperature"),
        ({"model": "fake", "messages": HELLO, "n": 9}, "n"),
        ({"model": "fake", "messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"model": "fake", "messages": HELLO, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "fake", "messages": HELLO, "response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_bad_body_names_the_field(app: ServeApp, body: dict[str, object], param: str) -> None:
    response = httpx.post(f"{app.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]


def test_bad_body_through_openai_client(app: ServeApp) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        app.client().chat.completions.create(model="fake", messages=HELLO, n=9)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "n"


def test_not_json_is_a_clear_400(app: ServeApp) -> None:
    response = httpx.post(
        f"{app.base_url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.mark.parametrize(("route", "body"), [
    ("/chat/completions", b'{"model": "fake", "messages": [{"role": "user", "content": "\\ud800 hello"}]}'),
    ("/completions", b'{"model": "fake", "prompt": "\\udfff"}'),
    ("/responses", b'{"model": "fake", "input": "\\ud800"}'),
])
def test_a_lone_surrogate_is_a_400_before_any_model_call(app: ServeApp, route: str, body: bytes) -> None:
    """json.loads takes "\\ud800"; no answer could be written with it. Refused before the upstream is
    called (nothing billed), and the connection stays usable."""
    with httpx.Client(base_url=app.base_url, timeout=30) as client:
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]
        assert app.upstream.stats()["calls"] == 0
        assert client.post("/chat/completions", json={"model": "fake", "messages": HELLO}).status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "words"),
    [
        (b"[1, 2]", {"content-type": "application/json"}, "is not a JSON object"),
        (b"", {"content-type": "application/json"}, "is missing"),
        (b"model=fake", {"content-type": "application/x-www-form-urlencoded"},
         "was sent as application/x-www-form-urlencoded, not JSON"),
        # A JSON object under another content type: the content type is what is wrong.
        (b'{"model": "fake"}', {"content-type": "text/plain"}, "was sent as text/plain, not JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_says_so(
    app: ServeApp, content: bytes, headers: dict[str, str], words: str
) -> None:
    response = httpx.post(f"{app.base_url}/chat/completions", content=content, headers=headers, timeout=30)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert words in message and "Content-Type: application/json" in message


def test_oversized_body_is_413(app: ServeApp) -> None:
    big = "x" * 1_100_000
    response = httpx.post(
        f"{app.base_url}/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": big}]},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def nested(levels: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(900)}}},
         "response_format.json_schema"),
        ({"x_vendor_field": nested(900)}, None),  # an unknown field: the message names it
        ({"messages": [{"role": "user", "content": [nested(900)]}]}, "messages.0.content"),
    ],
)
def test_values_nested_too_deep_are_400s_not_500s(app: ServeApp, extra: dict[str, object], param: str | None) -> None:
    response = httpx.post(f"{app.base_url}/chat/completions",
                          json={"model": "fake", "messages": HELLO, "max_tokens": 4, **extra}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "nested more than 64 levels" in error["message"]
    if param is None:
        assert "x_vendor_field" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_whose_grammar_would_crash_llama_cpp_is_a_400_and_the_model_stays_up(
    app: ServeApp, stream: bool
) -> None:
    """maxLength 3000 is a grammar 3,000 groups deep: llama.cpp's recursive parser overflowed the
    generation thread's stack and killed the worker (found by a hostile-tenant walkthrough)."""
    with app.client() as client:
        schema = {"type": "string", "maxLength": 3000}
        with pytest.raises(openai.BadRequestError) as caught:
            reply = client.chat.completions.create(
                model="smollm2", messages=HELLO, max_tokens=3, stream=stream,
                response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": schema}},
            )
            if stream:
                list(reply)  # type: ignore[arg-type]
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == "response_format.json_schema.schema"
        assert "nest 3,0" in body["message"]
        # What the grammar cannot express is refused too, not silently dropped.
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="smollm2", messages=HELLO, max_tokens=3,
                response_format={"type": "json_schema", "json_schema": {"name": "neg", "schema": {
                    "type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}}},
            )
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == "response_format.json_schema.schema.properties.a.not"
        # The worker is alive: the same model answers the next request, with a schema it can take.
        fine = client.chat.completions.create(
            model="smollm2", messages=HELLO, max_tokens=3,
            response_format={"type": "json_schema", "json_schema": {"name": "short",
                                                                     "schema": {"type": "string", "maxLength": 200}}},
        )
        assert fine.choices[0].message.content is not None


def test_prompt_longer_than_context_is_400(app: ServeApp) -> None:
    long_text = "word " * 5000
    with pytest.raises(openai.BadRequestError) as caught:
        app.client().chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": long_text}], max_tokens=8
        )
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "messages"


def test_healthz_and_docs(app: ServeApp) -> None:
    health = httpx.get(f"{app.url}/readyz", timeout=10).json()
    assert health["status"] == "ok" and "smollm2" in health["models"]
    assert health["catalogue"]["state"] == "current" and health["catalogue"]["tasks"] >= 1
    spec = httpx.get(f"{app.url}/openapi.json", timeout=10).json()
    assert "/v1/chat/completions" in spec["paths"]
    assert httpx.get(f"{app.url}/docs", timeout=10).status_code == 200
    assert httpx.get(f"{app.url}/redoc", timeout=10).status_code == 404  # its assets come from CDNs: not served
    # Task management lives in /docs too, and no route describes the caller as a parameter.
    assert "/v1/tasks/push" in spec["paths"]
    assert all(p.get("name") != "caller" for ops in spec["paths"].values() for op in ops.values()
               for p in op.get("parameters", []))


def test_same_api_through_serve_proxy(app: ServeApp) -> None:
    client = openai.OpenAI(base_url=f"{app.proxy_url}/v1", api_key="unused", max_retries=0, timeout=30)
    reply = client.chat.completions.create(model="fake", messages=HELLO)
    assert reply.choices[0].message.content == "echo: Say hello in three words."
