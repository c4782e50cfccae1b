"""Batch lines and the OpenAI Files and Batches API bodies.

JSONL lines of a batch (what `jobs.batch` reads and writes), and the bodies of
`deployments.gateway.batch_routes`. Output lines and views follow the OpenAI shapes, so the openai
client parses them unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from deployments.schemas.base import OpenAIBody, OwnBody
from deployments.schemas.chat import ChatCompletionRequest
from deployments.schemas.completions import CompletionRequest
from deployments.schemas.embeddings import EmbeddingRequest
from deployments.schemas.responses import ResponseCreate

BATCH_CHAT_URL = "/v1/chat/completions"
BATCH_EMBEDDINGS_URL = "/v1/embeddings"
BATCH_COMPLETIONS_URL = "/v1/completions"
BATCH_RESPONSES_URL = "/v1/responses"
# A batch's endpoint; its lines may use any of these urls (and task lines), mixed in one file.
BatchEndpoint = Literal["/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/responses"]


class _ModelLine(OwnBody):
    """An input line of the OpenAI batch format: one request to a model route, never a stream."""

    custom_id: str = Field(min_length=1, max_length=512, description="Caller's id; unique within a batch.")
    method: Literal["POST"] = Field(description="Always `POST`.")

    @field_validator("body", check_fields=False)
    @classmethod
    def _not_streaming(cls, value: Any) -> Any:
        if getattr(value, "stream", False):
            raise ValueError("stream must be false in a batch")
        return value


class BatchChatLine(_ModelLine):
    """One chat completion request."""

    url: Literal["/v1/chat/completions"] = Field(description="The endpoint: `/v1/chat/completions` here; "
                                                 "`/v1/embeddings`, `/v1/completions` and `/v1/responses` "
                                                 "lines may be mixed in.")
    body: ChatCompletionRequest = Field(description="A POST /v1/chat/completions body (`model` required).")


class BatchEmbeddingLine(_ModelLine):
    """One embeddings request."""

    url: Literal["/v1/embeddings"] = Field(description="The endpoint.")
    body: EmbeddingRequest = Field(description="A POST /v1/embeddings body (`model` required).")


class BatchCompletionLine(_ModelLine):
    """One legacy text completion request."""

    url: Literal["/v1/completions"] = Field(description="The endpoint.")
    body: CompletionRequest = Field(description="A POST /v1/completions body (`model` required).")


class BatchResponseLine(_ModelLine):
    """One response (``core.responses``: a chat call)."""

    url: Literal["/v1/responses"] = Field(description="The endpoint.")
    body: ResponseCreate = Field(description="A POST /v1/responses body (`model` required).")


class BatchTaskLine(OwnBody):
    """An input line running a promptfleet task (`task` may come from `jobs.batch --task`)."""

    custom_id: str = Field(min_length=1, max_length=512, description="Caller's id; unique within a batch.")
    task: str = Field(min_length=1, description="Task name, as in GET /v1/tasks.")
    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")


class BatchResponse(OwnBody):
    status_code: int = Field(description="HTTP status the same request would have got from the API.")
    request_id: str = Field(description="Id of this request, `<prefix>-<line number>` (the batch's id as "
                            "prefix through the Batches API): its model calls are logged under it.")
    body: dict[str, Any] = Field(description="The response body: a chat completion, a task result, "
                                 "or an error body `{error: {message, type, param, code}}`.")


class BatchLineError(OwnBody):
    code: str = Field(description="`invalid_json_line`, `invalid_request`, `duplicate_custom_id`, "
                      "`model_not_found`, `line_too_large`, …")
    message: str = Field(description="What is wrong, naming the field.")
    param: str | None = Field(default=None, description="Dotted path of the offending field, if one.")
    line: int | None = Field(default=None, description="1-based line number in the input file.")


class BatchOutputLine(OwnBody):
    """An output line. A request that ran has `response` (its status may be an error); a line that
    could not be run (malformed, duplicate id, unknown model) has `error` and its line number."""

    id: str = Field(description="Id of this output line (`batch_req_…`).")
    custom_id: str | None = Field(description="The input line's `custom_id` (null if it had none).")
    response: BatchResponse | None = Field(description="The response, when the request ran.")
    error: BatchLineError | None = Field(description="Why the line was not run.")


class BatchProgress(OwnBody):
    """The progress file a batch job rewrites as it goes (read by the batch service for counts)."""

    total: int = Field(description="Non-blank input lines.")
    completed: int = Field(default=0, description="Lines answered 2xx (this run and earlier runs).")
    failed: int = Field(default=0, description="Lines with an error line (this run and earlier runs).")
    prompt_tokens: int = Field(default=0, description="Prompt tokens used by this run.")
    completion_tokens: int = Field(default=0, description="Completion tokens used by this run.")
    total_tokens: int = Field(default=0, description="Tokens used by this run.")
    finished: bool = Field(default=False, description="Every line has an output or error line.")
    updated_at: float = Field(description="Unix time of this snapshot.")


class FileView(BaseModel):
    """An uploaded or produced file (OpenAI `file` object)."""

    id: str = Field(description="File id (`file-…`).")
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size in bytes.")
    created_at: int = Field(description="Unix time it was stored.")
    filename: str = Field(description="Name given at upload, or the produced file's name.")
    purpose: Literal["batch", "batch_output"] = Field(description="`batch` (input) or `batch_output`.")
    status: Literal["processed"] = Field(default="processed", description="Always `processed`.")
    expires_at: int | None = Field(default=None, description="Never set: files are kept until deleted.")
    status_details: str | None = Field(default=None, description="Unused.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileView]
    has_more: bool = Field(description="More files after the last one (pass its id as `after`).")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreate(OpenAIBody):
    """POST /v1/batches. Unknown fields (newer client options) are accepted and ignored."""

    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose `batch`.")
    endpoint: BatchEndpoint = Field(description="`/v1/chat/completions`, `/v1/embeddings`, `/v1/completions` or "
                                    "`/v1/responses`; "
                                    "lines of the other endpoints and task lines (`custom_id`, `task`, `input`) "
                                    "may be mixed in.")
    completion_window: Literal["24h"] = Field(description="Only `24h` (not enforced: batches run to the end).")
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 string pairs, kept as given.")

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value


class BatchRequestCounts(BaseModel):
    total: int = Field(description="Non-blank lines of the input file.")
    completed: int = Field(description="Lines answered 2xx.")
    failed: int = Field(description="Lines with an error line.")


class BatchErrorItem(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchErrorItem]


class BatchView(BaseModel):
    """A batch (OpenAI `batch` object), as its owner sees it."""

    id: str = Field(description="Batch id (`batch_…`); also the Ray job's submission id prefix.")
    object: Literal["batch"] = "batch"
    endpoint: str = Field(description="The endpoint of its lines.")
    input_file_id: str = Field(description="The input file.")
    completion_window: str = Field(description="As requested (`24h`).")
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ] = Field(description="From the Ray job: PENDING → `validating`, RUNNING → `in_progress`, "
              "SUCCEEDED → `completed`, FAILED → `failed`, STOPPED → `cancelled`.")
    output_file_id: str | None = Field(default=None, description="Output lines (once ended).")
    error_file_id: str | None = Field(default=None, description="Error lines (once ended, if any).")
    errors: BatchErrors | None = Field(default=None, description="Why the batch failed, if it did.")
    created_at: int = Field(description="Unix time it was created.")
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts = Field(description="Progress, from the job's progress file.")
    metadata: dict[str, str] | None = Field(default=None, description="As given at creation.")


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchView]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = Field(description="More batches after `last_id` (pass it as `after`).")
