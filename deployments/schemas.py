"""Wire formats: HTTP bodies and the payloads the Gateway hands to workers.

OpenAI-compatible request bodies tolerate unknown fields (clients send new ones
all the time) and reject what promptfleet cannot honour with a 400 naming the
field, instead of silently ignoring it. Our own bodies use ``extra="forbid"``.

This module imports nothing heavy (no ray, no llama_cpp): the Gateway, the
workers, jobs and tests all share it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

# Absolute bounds on client integers, whatever the model: nothing unbounded reaches the limiter's
# arithmetic or a C library (a 400-digit `max_tokens` is a 400 naming the field). A model's own
# output limit (`max_output_tokens` in its config) is checked on top, by the model call path.
MAX_TOKENS_LIMIT = 1_048_576
INT64_MAX = 2**63 - 1


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_OpenAIBody):
    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(
        description="Author of the message."
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Text, or a list of content parts (`{type: text, text}`)."
    )
    name: str | None = Field(default=None, description="Optional participant name.")


class StreamOptions(_OpenAIBody):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with `usage` and empty `choices`."
    )


class ResponseFormat(_OpenAIBody):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="`json_object`: any JSON object; `json_schema`: JSON matching `json_schema.schema`."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="`{name, schema, strict}` when `type` is `json_schema`."
    )

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema":
            schema = (self.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
        return self


class ChatCompletionRequest(_OpenAIBody):
    """POST /v1/chat/completions. Fields not listed here pass through to OpenAI-compatible upstreams."""

    model: str = Field(description="A model name from GET /v1/models.")
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    stream: bool = Field(default=False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS_LIMIT,
        description="Most tokens to generate; at most the model's `max_output_tokens`.",
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=MAX_TOKENS_LIMIT,
        description="Newer name of `max_tokens`; wins when both are set.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Nucleus sampling.")
    n: int = Field(default=1, description="Number of choices; only 1 is supported.")
    stop: str | list[str] | None = Field(default=None, description="Stop sequence(s), at most 4.")
    seed: int | None = Field(default=None, ge=-INT64_MAX - 1, le=INT64_MAX, description="Sampling seed (64-bit).")
    logprobs: bool | None = Field(default=None, description="Return log probabilities (upstream models).")
    top_logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Most likely tokens returned per position, with `logprobs`."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=300, description="Token id → bias in [-100, 100], at most 300 entries."
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, description="Frequency penalty.")
    response_format: ResponseFormat | None = Field(
        default=None, description="`text`, `json_object` or `json_schema` (grammar-constrained locally)."
    )
    user: str | None = Field(default=None, description="End-user id, for the operator's records.")

    # Field validators (not one model validator) so a 400 names the offending field.
    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and any(not -100 <= bias <= 100 for bias in value.values()):
            raise ValueError("biases must be between -100 and 100")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        """The field that sets the output length (for a 400 naming it)."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# -- what crosses the ModelWorker handle ------------------------------------------------------
# ``deployments.model_calls`` sends a ``ModelCall``; the worker answers a ``ChatReply`` (JSON) or a
# stream of chunk dicts ended by one ``StreamEnd``; expected errors come back as values (a
# ``PromptfleetError`` returned, or yielded last). See ``deployments.model_worker``.


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, usage: Any) -> Usage | None:
        """A provider's usage dict as a ``Usage``; None if it has none (or not numbers)."""
        if not isinstance(usage, dict):
            return None
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ModelCall(BaseModel):
    """One chat call for a ModelWorker: the validated request and the id it is logged under.

    It crosses the handle as its OpenAI body (a plain dict) and is validated again on arrival:
    pickling the nested pydantic models cost about four times as much (measured: 41 µs against
    11 µs per call, send and receive)."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest = Field(description="The validated chat request (`model` is the "
                                           "configured model the call is for, after fallbacks).")
    request_id: str = Field(description="Id of the request this call serves (logs, error bodies).")
    share: Share | None = Field(
        default=None, description="Who pays, for the fair share of a limited model's budget (None: unmetered)."
    )
    _body: dict[str, Any] | None = PrivateAttr(default=None)

    def body(self) -> dict[str, Any]:
        """The request as an OpenAI body: only what the client set (a copy: callers may edit it)."""
        if self._body is None:
            self._body = self.request.model_dump(exclude_unset=True, exclude_none=True)
        return dict(self._body)

    def __reduce__(self) -> tuple[Any, ...]:
        # The share as a tuple too: a pickled pydantic object doubled the payload (368 vs 194 bytes)
        # and cost ~7 µs more per call, send and receive.
        share = None if self.share is None else (self.share.tenant, self.share.weight, self.share.background)
        return (_model_call, (self.body(), self.request_id, share))


def _model_call(
    body: dict[str, Any], request_id: str, share: tuple[str, float | None, bool] | None = None
) -> ModelCall:
    # Built from what a validated ModelCall sent (__reduce__): the share needs no second check.
    shared = None if share is None else Share.model_construct(tenant=share[0], weight=share[1], background=share[2])
    call = ModelCall(request=ChatCompletionRequest.model_validate(body), request_id=request_id, share=shared)
    call._body = body
    return call


class ChatReply(BaseModel):
    """A worker's answer to a JSON chat call."""

    completion: dict[str, Any] = Field(description="The `chat.completion` body, `model` set to the model's name.")
    usage: Usage | None = Field(default=None, description="Tokens used, when the provider reported them.")

    @classmethod
    def of(cls, completion: dict[str, Any]) -> ChatReply:
        """The reply carrying a provider's completion dict, and its usage if it has one."""
        return cls(completion=completion, usage=Usage.of(completion.get("usage")))

    def __reduce__(self) -> tuple[Any, ...]:
        # As plain data, rebuilt on arrival: pickling the pydantic objects themselves cost about
        # five times as much per call.
        usage = None if self.usage is None else (self.usage.prompt_tokens, self.usage.completion_tokens)
        return (_chat_reply, (self.completion, usage))


def _chat_reply(completion: dict[str, Any], usage: tuple[int, int] | None) -> ChatReply:
    counted = None if usage is None else Usage(
        prompt_tokens=usage[0], completion_tokens=usage[1], total_tokens=usage[0] + usage[1])
    return ChatReply(completion=completion, usage=counted)


class StreamEnd(BaseModel):
    """The last item of a worker's stream: what the generation used (None if the provider did not say)."""

    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str = Field(description="Model name to send as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the application started.")
    owned_by: str = Field(description="`promptfleet` and the provider kind, e.g. `promptfleet:llamacpp`.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Liveness(BaseModel):
    """`/healthz`: this Gateway replica's event loop answers (always 200; nothing else is asked)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"] = Field(description="Always `ok`: an answer at all is the signal.")
    node: str = Field(description="Address of the node this Gateway replica runs on.")


class ModelReadiness(BaseModel):
    """What a model's worker says about itself (``ModelWorker.readiness``), as `/readyz` shows it."""

    model_config = ConfigDict(extra="forbid")

    replicas: Literal["up", "down"] = Field(
        description="`up` when a worker replica answered within the probe's timeout (a model whose replicas "
        "are all busy or gone reads `down`)."
    )
    upstream: Literal["ok", "unreachable", "local", "unknown"] = Field(
        description="An upstream model: whether the worker could open a TCP connection to its `base_url`. "
        "`local`: a llama.cpp model (nothing to reach). `unknown`: no replica answered."
    )

    @property
    def serving(self) -> bool:
        return self.replicas == "up" and self.upstream in ("ok", "local")


class Readiness(BaseModel):
    """`/readyz`: whether this node's Gateway can serve (200) or not (503), for a load balancer and a person."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["ok", "unavailable"] = Field(
        description="`ok` when the store answers and at least one model can serve (a replica up, its upstream "
        "reachable); else `unavailable` (HTTP 503)."
    )
    store: Literal["ok", "unreachable"] = Field(description="Whether the TaskStore answered its health check.")
    models: dict[str, ModelReadiness] = Field(description="Per model this gateway routes to: replicas, upstream.")
    node: str = Field(description="Address of the node this Gateway replica runs on.")


# -- tasks and runs ------------------------------------------------------------------------


class _Ours(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskInfo(_Ours):
    name: str = Field(description="Task name, used in /v1/tasks/{name}/run and /submit.")
    description: str = Field(description="What the task does.")
    model: str = Field(description="Model that runs it.")
    fallback_models: list[str] = Field(description="Models tried, in order, when the model fails.")
    input_schema: dict[str, Any] = Field(description="JSON Schema of `input`.")
    output_schema: dict[str, Any] = Field(description="JSON Schema the validated `output` satisfies.")
    version: int | None = Field(default=None, description="The active version: what new runs execute.")
    content_hash: str | None = Field(default=None, description="SHA-256 of the active version's definition.")


class TaskList(_Ours):
    object: Literal["list"] = "list"
    data: list[TaskInfo]


class TaskRunRequest(_Ours):
    """Body of POST /v1/tasks/{name}/run and /submit."""

    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")
    model: str | None = Field(
        default=None, max_length=200,
        description="/run only, keys with the prompts scope (or the admin): run the task on this model instead "
        "of its own, without fallbacks (`promptfleet tasks test --model`).",
    )


class TaskResult(_Ours):
    """A task's validated result (synchronous run, or `result` of a succeeded run)."""

    task: str = Field(description="Task name.")
    output: Any = Field(description="The model's output, valid against the task's output schema.")
    model: str = Field(description="Model that produced it (a fallback model if the primary failed).")
    attempts: int = Field(description="Model calls it took (the repair loop retries invalid output).")
    usage: Usage = Field(description="Tokens used by all attempts.")
    task_version: int | None = Field(default=None, description="The task version that ran.")


class RunView(_Ours):
    """An asynchronous run of a task, as its owner sees it."""

    id: str = Field(description="Run id.")
    object: Literal["task.run"] = "task.run"
    task: str = Field(description="Task name.")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="`queued` → `running` → `succeeded` | `failed`; `cancelled` by the owner."
    )
    attempt: int = Field(description="Times a runner has started it (more than 1 after a lost lease).")
    created_at: float = Field(description="Unix time it was accepted.")
    started_at: float | None = Field(description="Unix time it first started.")
    finished_at: float | None = Field(description="Unix time it reached a final status.")
    result: dict[str, Any] | None = Field(description="`{task, output, model, attempts}` once succeeded.")
    error: dict[str, Any] | None = Field(description="The error object (OpenAI shape) once failed.")
    usage: Usage | None = Field(description="Tokens used, when known.")
    task_version: int | None = Field(
        default=None,
        description="The task version the run executes: the one active when it was submitted. A run queued "
        "before a push or rollback keeps it. Empty for runs queued before task versions existed (they run "
        "the active version).",
    )
    request_id: str | None = Field(
        default=None, description="Id of the request that submitted it (its `X-Request-ID`); the run's model "
        "calls are logged under it. Empty for runs stored before request ids existed."
    )


class RunList(_Ours):
    object: Literal["list"] = "list"
    data: list[RunView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; empty on the last.")


# -- task management (prompts scope) -------------------------------------------------------


class TaskFile(_Ours):
    """One task file as its owner wrote it."""

    file: str = Field(min_length=1, max_length=500, description="The file's name (problems name it; its stem "
                      "must equal the task's name).")
    source: str = Field(max_length=200_000, description="The file's YAML text.")


class TaskFiles(_Ours):
    """Body of POST /v1/tasks/check and /v1/tasks/push."""

    files: list[TaskFile] = Field(min_length=1, max_length=200, description="The task files.")


class TaskProblem(_Ours):
    file: str = Field(description="The file it is in.")
    line: int | None = Field(description="1-based line, when known.")
    field: str = Field(description="Dotted path of the field (`output_schema.properties.label`); empty: the file.")
    message: str = Field(description="What is wrong.")
    warning: bool = Field(description="true: reported, but the file is accepted.")


class TaskCheckResult(_Ours):
    ok: bool = Field(description="No errors (warnings allowed): a push of these files would be accepted.")
    tasks: list[str] = Field(description="Names of the tasks that passed.")
    problems: list[TaskProblem] = Field(description="Every problem, errors and warnings.")


class TaskPushed(_Ours):
    name: str = Field(description="Task name.")
    version: int = Field(description="Its active version now.")
    changed: bool = Field(description="false: the content equalled the active version, nothing was stored.")


class TaskPushResult(_Ours):
    object: Literal["list"] = "list"
    data: list[TaskPushed]
    problems: list[TaskProblem] = Field(description="Warnings of the check (a push with errors is refused whole).")


class TaskVersionView(_Ours):
    name: str = Field(description="Task name.")
    version: int = Field(description="Version number (1, 2, … per task).")
    content_hash: str = Field(description="SHA-256 of the canonical JSON definition.")
    author: str = Field(description="Key id of the pusher, `admin`, `anonymous` (authentication off) or `deploy`.")
    created_at: float = Field(description="Unix time it was stored.")
    active: bool = Field(description="The version new runs get.")
    source: str | None = Field(default=None, description="The file text (GET of one version only).")


class TaskActivationView(_Ours):
    version: int = Field(description="The version that became active.")
    action: Literal["deploy", "push", "rollback"] = Field(description="What made it active.")
    actor: str = Field(description="Who: key id, `admin`, `anonymous` or `deploy`.")
    at: float = Field(description="Unix time.")


class TaskHistory(_Ours):
    object: Literal["list"] = "list"
    name: str = Field(description="Task name.")
    data: list[TaskVersionView] = Field(description="Every version, newest first.")
    activations: list[TaskActivationView] = Field(description="Every change of the active version, newest first.")


class TaskRollback(_Ours):
    """Body of POST /v1/tasks/{name}/rollback."""

    version: int = Field(ge=1, le=2**31 - 1, description="The stored version to make active again.")


class TaskRenderRequest(_Ours):
    """Body of POST /v1/tasks/{name}/render."""

    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")
    version: int | None = Field(default=None, ge=1, le=2**31 - 1, description="A stored version; empty: the "
                                "active one.")


class TaskRendered(_Ours):
    task: str = Field(description="Task name.")
    version: int | None = Field(description="The version rendered.")
    model: str = Field(description="Model the messages go to first.")
    messages: list[dict[str, str]] = Field(description="The exact chat messages of the first attempt.")
    response_format: dict[str, Any] = Field(description="The `response_format` sent with them.")


class RunDetail(RunView):
    """A run as the admin's console sees it: the view plus who owns it and what it was given."""

    owner: str = Field(description="The key id the run belongs to (`anonymous` without authentication).")
    input: dict[str, Any] = Field(description="The task input as submitted.")
    updated_at: float = Field(description="Unix time of the last change.")
    idempotency_key: str | None = Field(description="The Idempotency-Key it was submitted with, if any.")
    worker_id: str | None = Field(description="The TaskRunner replica that last held it.")
    available_at: float | None = Field(description="A queued run waiting out a backoff is not started before this.")


class RunDetailList(_Ours):
    data: list[RunDetail]
    next_cursor: str | None = Field(description="The cursor of the next page; empty on the last.")


# -- API keys and usage ----------------------------------------------------------------------


class KeyLimits(_Ours):
    """Body of PATCH /v1/admin/keys/{id}: the key's limits, replaced whole (empty: unlimited)."""

    rpm: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Requests per minute (chat, task runs, batch lines)."
    )
    tpm: int | None = Field(
        default=None, ge=1, le=1_000_000_000, description="Tokens per minute (estimated, then settled)."
    )
    token_budget: int | None = Field(
        default=None, ge=1, le=10**15, description="Total tokens this key may ever use."
    )
    weight: float = Field(
        default=1.0, gt=0, le=1000,
        description="Share of a shared model budget when keys wait for it together: a key of weight 2 gets "
        "twice the calls of a key of weight 1 while both have calls waiting.",
    )


class KeyCreate(KeyLimits):
    """Body of POST /v1/admin/keys."""

    name: str = Field(min_length=1, max_length=200, description="Who or what the key is for.")
    scope: Literal["tenant", "prompts"] = Field(
        default="tenant",
        description="`tenant`: the API's normal use. `prompts`: the same, and also checks, pushes, rolls back "
        "and reads the history of tasks (/v1/tasks/check, /push, /{name}/versions, /{name}/rollback, "
        "/{name}/render); nothing else that needs the admin key.",
    )


class KeyView(_Ours):
    id: str = Field(description="Key id; also the owner of the runs and batches made with the key.")
    object: Literal["api_key"] = "api_key"
    name: str = Field(description="Who or what the key is for.")
    hint: str = Field(description="Last 4 characters of the key.")
    created_at: float = Field(description="Unix time of creation.")
    revoked_at: float | None = Field(description="Unix time of revocation; empty while active.")
    rpm: int | None = Field(description="Requests per minute, if limited.")
    tpm: int | None = Field(description="Tokens per minute, if limited.")
    token_budget: int | None = Field(description="Total tokens allowed, if limited.")
    weight: float = Field(description="Share of a shared model budget under contention (1 unless set).")
    tokens_used: int = Field(description="Tokens recorded for this key so far.")
    scope: Literal["tenant", "prompts"] = Field(default="tenant", description="`tenant` or `prompts` "
                                                "(may also manage tasks).")


class KeyCreated(KeyView):
    key: str = Field(description="The API key. Shown only in this response; store it now.")


class KeyList(_Ours):
    """A page of GET /v1/admin/keys (OpenAI's list shape: pass `last_id` as `after` for the next)."""

    object: Literal["list"] = "list"
    data: list[KeyView]
    first_id: str | None = Field(default=None, description="Id of the first key of this page; empty if none.")
    last_id: str | None = Field(default=None, description="Id of the last key of this page; empty if none.")
    has_more: bool = Field(default=False, description="More keys follow `last_id` (pass it as `after`).")


class UsageRow(_Ours):
    key_id: str = Field(description="The key the usage is billed to.")
    model: str = Field(description="The model called.")
    day: str = Field(description="UTC date, YYYY-MM-DD.")
    requests: int = Field(description="Model calls that day.")
    prompt_tokens: int = Field(description="Prompt tokens that day.")
    completion_tokens: int = Field(description="Completion tokens that day.")
    total_tokens: int = Field(description="Prompt and completion tokens that day.")


class UsageList(_Ours):
    """A page of GET /v1/usage: newest day first, then by key and model."""

    object: Literal["list"] = "list"
    data: list[UsageRow]
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` (with the same filters) for the "
                                    "next page; empty on the last.")


class UsageCsv(_Ours):
    """A page of usage rows as CSV lines (the console's export streams these)."""

    csv: str = Field(description="CSV lines of the page's rows, after the header line on the first page.")
    next_cursor: str | None = Field(default=None, description="The cursor of the next page; empty on the last.")


class DayTokens(_Ours):
    """One day of the console's tokens-per-day chart (summed by the store's database)."""

    day: str = Field(description="UTC date, YYYY-MM-DD.")
    total_tokens: int = Field(description="Tokens of every key and model that day (or of the key asked for).")


class ModelUsage(_Ours):
    """One model's calls on one day, every key together (the console's overview of today)."""

    model: str = Field(description="The model called.")
    requests: int = Field(description="Model calls.")
    prompt_tokens: int = Field(description="Prompt tokens.")
    completion_tokens: int = Field(description="Completion tokens.")
    total_tokens: int = Field(description="Prompt and completion tokens.")


# -- batches -------------------------------------------------------------------------------
# JSONL lines of a batch (what `jobs.batch` reads and writes), and the OpenAI Files and Batches
# API bodies (`deployments.gateway.batch_routes`). Output lines and views follow the OpenAI shapes, so
# the openai client parses them unchanged.

BATCH_CHAT_URL = "/v1/chat/completions"


class BatchChatLine(_Ours):
    """An input line of the OpenAI batch format: one chat completion request."""

    custom_id: str = Field(min_length=1, max_length=512, description="Caller's id; unique within a batch.")
    method: Literal["POST"] = Field(description="Always `POST`.")
    url: Literal["/v1/chat/completions"] = Field(description="The endpoint; only chat completions.")
    body: ChatCompletionRequest = Field(description="A POST /v1/chat/completions body (`model` required).")

    @field_validator("body")
    @classmethod
    def _not_streaming(cls, value: ChatCompletionRequest) -> ChatCompletionRequest:
        if value.stream:
            raise ValueError("stream must be false in a batch")
        return value


class BatchTaskLine(_Ours):
    """An input line running a promptfleet task (`task` may come from `jobs.batch --task`)."""

    custom_id: str = Field(min_length=1, max_length=512, description="Caller's id; unique within a batch.")
    task: str = Field(min_length=1, description="Task name, as in GET /v1/tasks.")
    input: dict[str, Any] = Field(description="The task's input, matching its `input_schema`.")


class BatchResponse(_Ours):
    status_code: int = Field(description="HTTP status the same request would have got from the API.")
    request_id: str = Field(description="Id of this request, `<prefix>-<line number>` (the batch's id as "
                            "prefix through the Batches API): its model calls are logged under it.")
    body: dict[str, Any] = Field(description="The response body: a chat completion, a task result, "
                                 "or an error body `{error: {message, type, param, code}}`.")


class BatchLineError(_Ours):
    code: str = Field(description="`invalid_json_line`, `invalid_request`, `duplicate_custom_id`, "
                      "`model_not_found`, …")
    message: str = Field(description="What is wrong, naming the field.")
    param: str | None = Field(default=None, description="Dotted path of the offending field, if one.")
    line: int | None = Field(default=None, description="1-based line number in the input file.")


class BatchOutputLine(_Ours):
    """An output line. A request that ran has `response` (its status may be an error); a line that
    could not be run (malformed, duplicate id, unknown model) has `error` and its line number."""

    id: str = Field(description="Id of this output line (`batch_req_…`).")
    custom_id: str | None = Field(description="The input line's `custom_id` (null if it had none).")
    response: BatchResponse | None = Field(description="The response, when the request ran.")
    error: BatchLineError | None = Field(description="Why the line was not run.")


class BatchProgress(_Ours):
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


class BatchCreate(_OpenAIBody):
    """POST /v1/batches. Unknown fields (newer client options) are accepted and ignored."""

    input_file_id: str = Field(min_length=1, max_length=64, description="A file uploaded with purpose `batch`.")
    endpoint: Literal["/v1/chat/completions"] = Field(description="Only `/v1/chat/completions`; task "
                                                    "lines (`custom_id`, `task`, `input`) may be mixed in.")
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


# -- the RateLimiter's payloads ------------------------------------------------------------
# What crosses the RateLimiter's handle (``deployments.rate_limiter``), booked through
# ``deployments.core.booking.BudgetClient``.


class Budget(_Ours):
    """Limits of one budget, sent with every booking (the limiter keeps no config); either may be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute.")
    rpm_burst: float | None = Field(
        default=None, ge=1, description="Requests that may start at once; empty: 0.5 % of `rpm` (at least 1)."
    )
    tpm_burst: float | None = Field(
        default=None, ge=1, description="Tokens that may start at once; empty: 0.5 % of `tpm` (at least 1)."
    )


class Share(_Ours):
    """Who a call on a shared model budget is for: its tenant's place in the fair queue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(max_length=200, description="The key id (or `anonymous`): the unit of fairness.")
    weight: float | None = Field(
        default=1.0, gt=0, le=1000,
        description="The key's `weight`; empty: the weight its interactive calls last brought (1 if none).",
    )
    background: bool = Field(
        default=False, description="An async task run or a batch line: served at the background share of "
        "its tenant's turns, behind the tenant's interactive calls."
    )


class BookingAsk(_Ours):
    """One call asking for its slot on a budget."""

    requests: int = Field(ge=0, description="Requests the call counts (1).")
    tokens: int = Field(ge=0, description="Estimated tokens (0 unless the budget has a `tpm`).")
    max_wait_s: float = Field(ge=0, description="Longest the call may wait for its slot (its deadline).")
    share: Share | None = Field(default=None, description="Its tenant, for a shared budget (fair queue); "
                                "empty: booked in arrival order (a key's own budget).")


class ReserveRequest(_Ours):
    """A replica's coalesced bookings on one budget (``RateLimiter.reserve``)."""

    budget: str = Field(description="`model:<name>` (upstream limits) or `key:<id>` (a key's limits).")
    limits: Budget = Field(description="The budget's limits.")
    asks: list[BookingAsk] = Field(description="The bookings, answered by index.")
    token_delta: int = Field(default=0, description="Real minus estimated tokens of earlier calls, settled first.")


class BookingAnswer(_Ours):
    """The answer to ``asks[index]``: start after ``delay_s``, or retry after ``delay_s`` (nothing booked)."""

    index: int = Field(ge=0, description="Position of the ask in its request.")
    granted: bool = Field(description="True: the slot is booked; False: it could not start within `max_wait_s`.")
    delay_s: float = Field(ge=0, description="Granted: seconds until the call may start. Refused: seconds until "
                           "a slot is expected to be free (the Retry-After).")


class PacerState(_Ours):
    """One unit (requests or tokens) of a budget, as the RateLimiter holds it now."""

    unit: Literal["requests", "tokens"]
    per_minute: float = Field(description="The limit, per minute.")
    capacity: float = Field(description="Units that may start at once (the burst).")
    available: float = Field(description="Units that could start now.")


class BudgetState(_Ours):
    """One budget of the RateLimiter (``model:<name>`` or ``key:<id>``) now."""

    budget: str
    pacers: list[PacerState]
    queued: int = Field(description="Calls waiting for their turn in the budget's fair queue.")
    paused_s: float = Field(description="Seconds left of a pause an upstream's 429 asked for (0: none).")


class LimiterState(_Ours):
    """What the RateLimiter holds now (the console's overview)."""

    budgets: list[BudgetState]
