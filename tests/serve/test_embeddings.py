"""/v1/embeddings and model capabilities, through the official client, on the real app.

The embedded embedding model is ``smollm2-embed`` (configs/serve.yaml: the SmolLM2 GGUF in llama.cpp's
embedding mode); ``fake`` is the fake upstream, which speaks /embeddings too.
"""

from __future__ import annotations

import asyncio
import base64

import httpx
import numpy as np
import openai
import pytest

from tests.fakes.upstream import FAKE_DIMENSIONS, fake_vector
from tests.fixtures import ServeApp

pytestmark = pytest.mark.serve

EMBED = "smollm2-embed"


def post(app: ServeApp, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{app.base_url}{path}", json=body, timeout=120)


def test_models_list_their_capabilities(app: ServeApp) -> None:
    cards = {m.id: m for m in app.client().models.list().data}
    assert cards[EMBED].model_extra == {"capabilities": ["embeddings"]}
    assert cards["smollm2"].model_extra == {"capabilities": ["chat", "completions", "responses"]}
    assert cards["fake"].model_extra == {"capabilities": ["chat", "completions", "responses", "embeddings"]}
    one = app.client().models.retrieve(EMBED)
    assert one.model_extra == {"capabilities": ["embeddings"]}


def test_embedded_model_embeds_strings_and_token_arrays(app: ServeApp) -> None:
    client = app.client()
    floats = client.embeddings.create(model=EMBED, input=["the cat sat", "a dog ran"], encoding_format="float")
    assert floats.model == EMBED and [d.index for d in floats.data] == [0, 1]
    first, second = (np.array(d.embedding) for d in floats.data)
    assert first.shape == second.shape and first.shape[0] > 100  # SmolLM2's hidden size
    assert abs(np.linalg.norm(first) - 1) < 1e-4 and not np.allclose(first, second)
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens
    # Alone or batched with another input, the same vector.
    alone = client.embeddings.create(model=EMBED, input="the cat sat", encoding_format="float")
    assert np.allclose(alone.data[0].embedding, first, atol=1e-4)
    tokens = client.embeddings.create(model=EMBED, input=[[1, 2, 3], [4, 5]], encoding_format="float")
    assert len(tokens.data) == 2 and tokens.usage.prompt_tokens == 5


def test_base64_embeddings_decode_to_the_float_ones(app: ServeApp) -> None:
    body = {"model": EMBED, "input": ["hello there", "general kenobi"]}
    floats = post(app, "/embeddings", {**body, "encoding_format": "float"}).json()["data"]
    encoded = post(app, "/embeddings", {**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, encoded, strict=True):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        assert np.allclose(decoded, f["embedding"], atol=1e-6)
    # The openai client asks for base64 by default and decodes it itself.
    default = app.client().embeddings.create(model=EMBED, input=body["input"])
    assert np.allclose(default.data[1].embedding, floats[1]["embedding"], atol=1e-6)


def test_256_inputs_in_one_request(app: ServeApp) -> None:
    inputs = [[token, token + 1] for token in range(100, 356)]
    reply = app.client().embeddings.create(model=EMBED, input=inputs, encoding_format="float")
    assert [d.index for d in reply.data] == list(range(256))
    assert reply.usage.prompt_tokens == 512
    vectors = np.array([d.embedding for d in reply.data])
    assert len({v.tobytes() for v in vectors.astype(np.float32)}) == 256  # one vector per input, in order
    single = app.client().embeddings.create(model=EMBED, input=[inputs[200]], encoding_format="float")
    assert np.allclose(single.data[0].embedding, vectors[200], atol=1e-4)


def test_upstream_embeddings_are_forwarded_with_dimensions(app: ServeApp) -> None:
    reply = app.client().embeddings.create(model="fake", input=["x y", "z"], encoding_format="float")
    assert reply.model == "fake" and reply.data[0].embedding == pytest.approx(fake_vector("x y"))
    assert len(reply.data[1].embedding) == FAKE_DIMENSIONS
    short = app.client().embeddings.create(model="fake", input="x y", dimensions=4)  # base64 by the client
    assert short.data[0].embedding == pytest.approx(fake_vector("x y", 4), abs=1e-6)
    assert app.upstream.stats()["prompts"][-1] == "x y"


def test_async_client_embeds(app: ServeApp) -> None:
    async def go() -> list[int]:
        async with openai.AsyncOpenAI(base_url=app.base_url, api_key="unused", max_retries=0, timeout=60) as client:
            replies = await asyncio.gather(*(client.embeddings.create(model=m, input=f"text {i}")
                                             for i, m in enumerate([EMBED, "fake", EMBED])))
        return [len(r.data[0].embedding) for r in replies]

    lengths = asyncio.run(go())
    assert lengths[0] == lengths[2] > FAKE_DIMENSIONS and lengths[1] == FAKE_DIMENSIONS


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"model": EMBED, "messages": [{"role": "user", "content": "hi"}]}),
        ("/chat/completions", {"model": EMBED, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("/completions", {"model": EMBED, "prompt": "hi"}),
        ("/embeddings", {"model": "smollm2", "input": "hi"}),
        ("/embeddings", {"model": "fake-retry", "input": "hi"}),  # an upstream model that only does text
    ],
)
def test_a_model_without_the_capability_is_a_400_naming_model(
    app: ServeApp, path: str, body: dict[str, object]
) -> None:
    calls = app.upstream.stats()["calls"]
    response = post(app, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and "does not serve" in error["message"]
    assert app.upstream.stats()["calls"] == calls


def test_the_client_raises_bad_request_for_a_capability_mismatch(app: ServeApp) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        app.client().chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.param == "model"
    with pytest.raises(openai.BadRequestError) as refused:
        app.client().embeddings.create(model="smollm2", input="hi")
    assert refused.value.param == "model"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": EMBED, "input": "hi", "dimensions": 8}, "dimensions"),
        ({"model": EMBED, "input": "hi", "dimensions": 0}, "dimensions"),
        ({"model": EMBED, "input": "hi", "dimensions": True}, "dimensions"),
        ({"model": EMBED, "input": []}, "input"),
        ({"model": EMBED, "input": ""}, "input"),
        ({"model": EMBED, "input": ["a", 1]}, "input"),
        ({"model": EMBED, "input": [[1, -1]]}, "input"),
        ({"model": EMBED, "input": [[1, True]]}, "input"),
        ({"model": EMBED, "input": ["x"] * 2049}, "input"),
        ({"model": EMBED, "input": [[10**9]]}, "input"),  # beyond the model's vocabulary
        ({"model": EMBED, "input": "word " * 600}, "input"),  # more than a batch of tokens
        ({"model": EMBED, "input": {"text": "hi"}}, "input"),
        ({"model": EMBED, "input": "hi", "encoding_format": "hex"}, "encoding_format"),
        ({"model": EMBED, "input": "hi", "truncate": True}, "truncate"),  # unknown: a local model refuses it
        ({"model": EMBED}, "input"),
        ({"input": "hi"}, "model"),
    ],
)
def test_bad_embedding_requests_are_400_naming_the_field(app: ServeApp, body: dict[str, object], param: str) -> None:
    response = post(app, "/embeddings", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    # Traffic under the limits still flows.
    assert post(app, "/embeddings", {"model": EMBED, "input": "fine"}).status_code == 200


def test_unknown_embedding_model_is_404(app: ServeApp) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        app.client().embeddings.create(model="nope", input="hi")
    assert missing.value.param == "model"
