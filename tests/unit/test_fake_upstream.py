"""The fake upstream over real HTTP, driven by the official openai client; and the load generator.

One server per module (``reset()`` between tests); tests that stop a server start their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pydantic
import pytest

from bench import loadtest
from bench.loadtest import run_load
from tests.fakes.upstream import FakeUpstream, minimal_instance
from tests.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


@pytest.fixture
def client(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fake.base_url, api_key="test", max_retries=0, timeout=5) as c:
        yield c


def wait_until(predicate: Any, timeout: float = 3.0) -> bool:
    return bool(wait_for(predicate, timeout_s=timeout, interval_s=0.01))


def test_completion_has_the_openai_shape(fake: FakeUpstream, client: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello there"}]
    completion = client.chat.completions.create(model="my-model", messages=messages)

    assert completion.object == "chat.completion"
    assert completion.model == "my-model"
    assert completion.id and completion.created > 0
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "echo: hello there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    usage = completion.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    assert fake.stats()["calls_by_mode"] == {"ok": 1}


def test_content_is_truncated_to_200_characters(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "y" * 500}])
    assert completion.choices[0].message.content == ("echo: " + "y" * 500)[:200]


def test_stream_reassembles_and_ends_with_usage(client: openai.OpenAI) -> None:
    with client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert 2 <= len(content_chunks) <= 4
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == "echo: stream me please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_chunks_sets_the_number_of_content_chunks(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure(stream_chunks=25)
    with client.chat.completions.create(model="m", messages=HELLO, stream=True) as stream:
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 25 and all(len(p) == 1 for p in pieces)
    assert "".join(pieces) == ("echo: hello" * 3)[:25]
    with pytest.raises(ValueError, match="stream_chunks"):
        fake.configure(stream_chunks=-1)


def test_chunk_interval_spaces_a_streams_events(fake: FakeUpstream, client: openai.OpenAI) -> None:
    # A lower bound only: the fake sleeps between its 7 events (role, 4 contents, stop, [DONE]),
    # so the whole stream cannot take less than 6 intervals; without the pauses it takes ~ms.
    fake.configure(stream_chunks=4, chunk_interval_ms=40)
    started = time.monotonic()
    with client.chat.completions.create(model="m", messages=HELLO, stream=True) as stream:
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == list("echo")
    assert time.monotonic() - started >= 6 * 0.040
    with pytest.raises(ValueError, match="chunk_interval_ms"):
        fake.configure(chunk_interval_ms=-1)


def test_stream_without_usage_option_has_no_usage_chunk(client: openai.OpenAI) -> None:
    with client.chat.completions.create(model="m", messages=HELLO, stream=True) as stream:
        chunks = list(stream)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


class Address(pydantic.BaseModel):
    city: str
    zip_code: str = pydantic.Field(min_length=5)


class Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=18)
    score: float
    active: bool
    kind: Literal["admin", "user"]
    tags: list[str]
    address: Address
    nickname: str | None
    note: str = "optional, so absent"


def test_json_schema_answer_is_a_valid_instance(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=HELLO,
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "strict": False, "schema": Person.model_json_schema()}})
    content = completion.choices[0].message.content or ""

    person = Person.model_validate_json(content)
    assert set(json.loads(content)) == set(Person.model_json_schema()["required"])
    assert person.kind == "admin" and person.age == 18 and person.address.zip_code == "xxxxx"


def test_json_object_answer_is_json(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=HELLO, response_format={"type": "json_object"})
    assert json.loads(completion.choices[0].message.content or "") == {"echo": "hello"}


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}},
     "required": ["a", "b"]},
    {"type": "array", "items": {"type": "integer", "minimum": 3}, "minItems": 2},
    {"type": "string", "format": "date-time"},
    {"type": "integer", "exclusiveMaximum": -2},
    {"type": ["null", "boolean"]},
    {"anyOf": [{"type": "string", "enum": ["b", "a"]}, {"type": "null"}]},
    {"allOf": [{"type": "object", "properties": {"x": {"const": 1}}, "required": ["x"]},
               {"type": "object", "properties": {"y": {"type": "boolean"}}, "required": ["y"]}]},
    {"$defs": {"Leaf": {"type": "object", "properties": {"v": {"type": "string", "minLength": 3}},
                        "required": ["v"]}},
     "type": "object", "properties": {"leaf": {"$ref": "#/$defs/Leaf"}}, "required": ["leaf"]},
])
def test_minimal_instance_validates(schema: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(minimal_instance(schema), schema)


def test_rate_limit_is_429_with_retry_after(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("rate_limit", retry_after=7)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="m", messages=HELLO)
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "rate_limit_error"


def test_error_is_500(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("error")
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="m", messages=HELLO)
    assert caught.value.status_code == 500


def test_hang_times_out_and_the_disconnect_is_noticed(fake: FakeUpstream) -> None:
    fake.configure("hang")
    with openai.OpenAI(base_url=fake.base_url, api_key="t", max_retries=0, timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            c.chat.completions.create(model="m", messages=HELLO)
    assert time.monotonic() - started < 3
    assert wait_until(lambda: fake.stats()["in_flight"] == 0)


def test_slow_answers_after_delay(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("slow", delay_s=0.3)
    started = time.monotonic()
    client.chat.completions.create(model="m", messages=HELLO)
    assert time.monotonic() - started >= 0.3


def test_drop_stream_breaks_the_stream(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("drop_stream")
    received = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        with client.chat.completions.create(model="m", messages=HELLO, stream=True) as stream:
            for chunk in stream:
                received.append(chunk)
    assert len(received) <= 2

    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=HELLO)


def test_fail_first_n_then_ok(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("error", fail_first_n=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="m", messages=HELLO)
    for _ in range(2):
        assert client.chat.completions.create(model="m", messages=HELLO).choices
    assert fake.stats()["calls_by_mode"] == {"error": 2, "ok": 2}


RESPONSE_EVENTS = [
    "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
    "response.output_text.delta", "response.output_text.done", "response.content_part.done",
    "response.output_item.done", "response.completed",
]


def test_responses_json_stream_and_tools_through_the_official_client(fake: FakeUpstream,
                                                                     client: openai.OpenAI) -> None:
    response = client.responses.create(model="m", instructions="be brief", input="hello there")
    assert response.id.startswith("resp_fake") and response.output_text == "echo: hello there"
    assert response.usage is not None and response.usage.output_tokens == 3
    events = list(client.responses.create(model="m", input="hello there", stream=True))
    types = [e.type for e in events]
    assert [t for i, t in enumerate(types) if not (t.endswith(".delta") and types[i - 1] == t)] == RESPONSE_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == "echo: hello there"  # type: ignore[union-attr]
    assert events[-1].response.usage.total_tokens > 0  # type: ignore[union-attr]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    called = client.responses.create(model="m", input="weather?", tool_choice="required", tools=[
        {"type": "function", "name": "w", "parameters": schema, "strict": False}])
    assert called.output[0].type == "function_call" and json.loads(called.output[0].arguments) == {"city": "x"}
    assert fake.stats()["calls_by_route"] == {"responses": 3}
    assert fake.stats()["last_bodies"]["responses"]["tool_choice"] == "required"


def test_responses_get_the_fault_modes(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("error", fail_first_n=1)
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model="m", input="x")
    assert client.responses.create(model="m", input="x").output_text == "echo: x"
    fake.configure("rate_limit", retry_after=3)
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model="m", input="x", stream=True)
    fake.configure("drop_stream")
    received = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for event in client.responses.create(model="m", input="x", stream=True):
            received.append(event)
    assert len(received) == 2
    fake.configure("hang")
    with openai.OpenAI(base_url=fake.base_url, api_key="t", max_retries=0, timeout=0.5) as c:
        with pytest.raises(openai.APITimeoutError):
            c.responses.create(model="m", input="x")
    assert wait_until(lambda: fake.stats()["in_flight"] == 0)


def test_control_over_http(fake: FakeUpstream, client: openai.OpenAI) -> None:
    with httpx.Client(base_url=fake.url) as http:
        response = http.post("/_control/config", json={"mode": "rate_limit", "retry_after": 5})
        assert response.status_code == 200 and response.json()["mode"] == "rate_limit"
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="m", messages=HELLO)
        assert caught.value.response.headers["retry-after"] == "5"

        stats = http.get("/_control/stats").json()
        assert stats["calls"] == 1 and stats["calls_by_mode"] == {"rate_limit": 1}
        assert stats["in_flight"] == 0 and stats["max_in_flight"] == 1
        assert len(stats["call_times"]) == 1 and abs(stats["call_times"][0] - time.time()) < 60

        bad = http.post("/_control/config", json={"mode": "nope"})
        assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
        assert http.post("/_control/config", json={"latency_ms": "x"}).status_code == 400
        assert http.post("/_control/config", json={"color": 1}).status_code == 400

        assert http.post("/_control/reset").status_code == 200
        assert http.get("/_control/stats").json()["calls"] == 0
    assert client.chat.completions.create(model="m", messages=HELLO).choices


def test_configure_rejects_bad_params(fake: FakeUpstream) -> None:
    with pytest.raises(ValueError):
        fake.configure("nope")
    with pytest.raises(TypeError):
        fake.configure("ok", colour="red")


def test_api_key_is_enforced_and_recorded(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure(api_key="sekret")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model="m", messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert fake.stats()["last_authorization"] == "Bearer test"

    with openai.OpenAI(base_url=fake.base_url, api_key="sekret", max_retries=0) as good:
        assert good.chat.completions.create(model="m", messages=HELLO).choices
    assert fake.stats()["last_authorization"] == "Bearer sekret"
    assert fake.stats()["calls_by_mode"] == {"unauthorized": 1, "ok": 1}


def test_reset_restores_the_start_up_latency() -> None:
    with FakeUpstream(latency_ms=200) as fake, httpx.Client(base_url=fake.url) as http:
        fake.configure("error")
        assert http.post("/_control/reset").json()["latency_ms"] == 200
        started = time.monotonic()
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": HELLO}).status_code == 200
        assert time.monotonic() - started >= 0.2


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model"]
    assert client.models.retrieve("other").id == "other"


def test_in_flight_is_tracked(fake: FakeUpstream, client: openai.OpenAI) -> None:
    fake.configure("slow", delay_s=0.5)  # long enough for the 3 calls to overlap on a busy machine
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.chat.completions.create, model="m", messages=HELLO)
                   for _ in range(3)]
        assert all(f.result().choices for f in futures)
    assert fake.stats()["max_in_flight"] == 3
    assert fake.stats()["in_flight"] == 0


def test_stop_ends_hanging_calls() -> None:
    fake = FakeUpstream().start()
    fake.configure("hang")
    with httpx.Client(timeout=30) as http, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, fake.base_url + "/chat/completions",
                              json={"model": "m", "messages": HELLO})
        assert wait_until(lambda: fake.stats()["in_flight"] == 1)
        started = time.monotonic()
        fake.stop()
        assert time.monotonic() - started < 5
        assert pending.result(timeout=5).status_code == 503


def test_run_load_against_the_fake(fake: FakeUpstream) -> None:
    result = asyncio.run(run_load(fake.base_url, "fake-model", 4, 1.0))
    assert result.ok > 0 and result.errors == {} and result.error_count == 0
    assert result.rps == result.ok / 1.0
    assert len(result.latencies_ms) == result.ok and (result.percentile_ms(50) or 0) > 0


def test_run_load_streams_and_counts_errors(fake: FakeUpstream) -> None:
    streamed = asyncio.run(run_load(fake.base_url, "m", 2, 0.3, api_key="k", stream=True))
    assert streamed.ok > 0 and streamed.errors == {}
    assert fake.stats()["last_authorization"] == "Bearer k"

    fake.configure("rate_limit")
    limited = asyncio.run(run_load(fake.base_url, "m", 2, 0.3))
    assert limited.ok == 0 and limited.errors["429"] > 0
    fake.configure("drop_stream")
    dropped = asyncio.run(run_load(fake.base_url, "m", 2, 0.3, stream=True))
    assert dropped.ok == 0 and dropped.error_count > 0


def test_run_load_is_bounded_in_time_and_counts_timeouts(fake: FakeUpstream) -> None:
    fake.configure("hang")
    started = time.monotonic()
    hung = asyncio.run(run_load(fake.base_url, "m", 3, 0.3, grace=0.3))
    assert time.monotonic() - started < 3
    assert hung.ok == 0 and hung.errors == {}
    assert wait_until(lambda: fake.stats()["in_flight"] == 0)

    fake.configure("slow", delay_s=1.0)
    slow = asyncio.run(run_load(fake.base_url, "m", 2, 0.5, request_timeout=0.2, grace=1.0))
    assert slow.ok == 0 and slow.errors["timeout"] >= 2


def test_percentiles_are_nearest_rank() -> None:
    result = loadtest.LoadResult("u", 1, 1.0, ok=100, latencies_ms=[float(x) for x in range(100, 0, -1)])
    assert [result.percentile_ms(q) for q in (50, 90, 99, 100)] == [50.0, 90.0, 99.0, 100.0]
    assert loadtest.LoadResult("u", 1, 1.0).percentile_ms(50) is None
    assert result.summary()["p90_ms"] == 90.0


def test_loadtest_main_compares_and_prints_json(
    fake: FakeUpstream, capsys: pytest.CaptureFixture[str]
) -> None:
    code = loadtest.main(["--url", fake.base_url, "--compare-url", fake.base_url,
                          "--concurrency", "1,2", "--duration", "0.3", "--warmup", "0",
                          "--json"])
    out, err = capsys.readouterr()
    assert code == 0
    summary = json.loads(out)
    assert [level["concurrency"] for level in summary["levels"]] == [1, 2]
    assert all(level["a"]["ok"] > 0 and level["b"]["ok"] > 0 and level["ratio_a_over_b"] > 0
               for level in summary["levels"])
    assert "A/B" in err


def test_fake_upstream_program_prints_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.upstream", "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "error"})
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        response = httpx.get(url + "/v1/models")
        assert response.json()["data"][0]["id"] == "fake-model"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
