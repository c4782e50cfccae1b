"""The exception tree: every class pickles, renders the OpenAI shape, and maps to its status."""

from __future__ import annotations

import pickle

import pytest

from deployments import errors
from deployments.errors import PromptfleetError, all_error_classes


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_survives_pickle(cls: type[PromptfleetError]) -> None:
    original = cls("message", param="field", retry_after=2.5, details={"attempts": 3})
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is cls
    assert (copy.message, copy.param, copy.retry_after, copy.details) == ("message", "field", 2.5, {"attempts": 3})
    assert copy.to_body() == original.to_body()


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_body_is_the_openai_error_shape(cls: type[PromptfleetError]) -> None:
    body = cls("boom", param="model").to_body()
    assert set(body) == {"error"}
    assert body["error"] == {"message": "boom", "type": cls.type, "param": "model", "code": cls.code}


def test_tree_in_docstring_matches_the_classes() -> None:
    doc = errors.__doc__ or ""
    for cls in all_error_classes():
        assert f"{cls.__name__} " in doc, cls.__name__
        assert f"{cls.status_code} {cls.code}" in doc, cls.__name__


@pytest.mark.parametrize(
    ("cls", "status"),
    [
        (errors.InvalidRequest, 400),
        (errors.RequestTooLarge, 413),
        (errors.AuthenticationFailed, 401),
        (errors.PermissionDenied, 403),
        (errors.ModelNotFound, 404),
        (errors.Conflict, 409),
        (errors.UpstreamRateLimited, 429),
        (errors.UpstreamError, 502),
        (errors.Overloaded, 503),
        (errors.UpstreamTimeout, 504),
    ],
)
def test_status_codes(cls: type[PromptfleetError], status: int) -> None:
    assert cls("x").status_code == status


def test_retry_after_is_whole_seconds_rounded_up() -> None:
    assert errors.Overloaded("x", retry_after=0.2).headers() == {"Retry-After": "1", "retry-after-ms": "200"}
    assert errors.RateLimited("x", retry_after=2.01).headers() == {"Retry-After": "3", "retry-after-ms": "2010"}
    assert errors.UpstreamError("x").headers() == {}


@pytest.mark.parametrize(("loc", "path"), [
    (("messages", 0, "content", "str"), "messages.0.content"),
    (("tool_choice", "literal['none','auto','required']"), "tool_choice"),
    (("body", "input", "list[union[str,EasyInputMessage]]", 2, "EasyInputMessage", "role"), "body.input.2.role"),
    (("body", "response_format", "function-after[check(), dict[str,any]]"), "body.response_format"),
    (("metadata", "team"), "metadata.team"),  # a key the client chose stays
    ((), ""),
])
def test_a_field_path_leaves_out_the_labels_pydantic_gives_union_members(loc: tuple[str | int, ...], path: str) -> None:
    assert errors.field_path(loc) == path
