"""The typed clients (``deployments.clients``): Ray's failures mapped the same way by every client,
error values raised, and each client's handle calls fitting its shell's signatures (no Ray: fake
handles on one event loop)."""

from __future__ import annotations

import ast
import asyncio
import inspect
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import (
    ActorDiedError,
    ActorUnavailableError,
    GetTimeoutError,
    NodeDiedError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)

from deployments import errors
from deployments.batch_service import BatchService
from deployments.clients import failures
from deployments.clients.base import HandleClient
from deployments.clients.batches import BatchClient
from deployments.clients.keys import KeysClient
from deployments.clients.limiter import LimiterClient
from deployments.clients.runner import RunnerClient
from deployments.clients.runs import LeasesClient, RunsClient
from deployments.clients.sessions import SessionsClient
from deployments.clients.task_versions import TaskVersionsClient
from deployments.clients.workers import WorkerClient
from deployments.limits.rate_limiter import RateLimiter
from deployments.model_worker import ModelWorker
from deployments.task_runner import TaskRunner
from deployments.task_store import TaskStore

REPO = Path(__file__).resolve().parents[2]

BUSY = [BackPressureError(num_queued_requests=10, max_queued_requests=10)]
GONE = [
    RayActorError(),
    ActorDiedError(),
    ActorUnavailableError("unavailable", None),
    WorkerCrashedError(),
    NodeDiedError("node died"),
    DeploymentUnavailableError(DeploymentID(name="TaskRunner", app_name="promptfleet")),
    ReplicaUnavailableError("replica-1"),
    GetTimeoutError("no answer"),
]

# One call of each client, and the shell class whose methods its handle reaches.
CALLS: list[tuple[str, Callable[[Any], HandleClient], type, Callable[[Any], Awaitable[Any]]]] = [
    ("runs", RunsClient, TaskStore, lambda c: c.get("run_1", owner=None)),
    ("leases", LeasesClient, TaskStore, lambda c: c.renew("run_1", "token")),
    ("keys", KeysClient, TaskStore, lambda c: c.snapshot(known_version=None)),
    ("sessions", SessionsClient, TaskStore, lambda c: c.ended("session")),
    ("task_versions", TaskVersionsClient, TaskStore, lambda c: c.changes(None, None, "")),
    ("runner", RunnerClient, TaskRunner, lambda c: c.run("t", {}, payer=None)),
    ("batches", BatchClient, BatchService, lambda c: c.get_batch(None, "batch_1")),
    ("workers", lambda h: WorkerClient(h, "m"), ModelWorker, lambda c: c.readiness()),
    ("limiter", LimiterClient, RateLimiter, lambda c: c.state()),
]
WHO = {"runs": "The task store", "leases": "The task store", "keys": "The task store",
       "sessions": "The task store", "task_versions": "The task store", "runner": "The task runner",
       "batches": "The batch service", "workers": "Model 'm'", "limiter": "The rate limiter"}


class Method:
    def __init__(self, answer: Callable[..., Any]) -> None:
        self.answer = answer

    async def remote(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0)  # a real await point, like a handle call
        return self.answer(*args, **kwargs)


class FakeHandle:
    """Every ``handle.<method>.remote(...)`` answers ``answer(*args)``: a value, or raises."""

    def __init__(self, answer: Callable[..., Any]) -> None:
        self.answer = answer

    def __getattr__(self, name: str) -> Method:
        return Method(self.answer)


def raising(exc: BaseException) -> FakeHandle:
    def answer(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return FakeHandle(answer)


def outcome(name: str, handle: FakeHandle) -> BaseException | None:
    _, build, _, call = next(c for c in CALLS if c[0] == name)

    async def go() -> None:
        await call(build(handle))

    try:
        asyncio.run(go())
    except BaseException as exc:  # what the client raised is the subject here
        return exc
    return None


@pytest.mark.parametrize("name", [c[0] for c in CALLS])
@pytest.mark.parametrize("failure", BUSY, ids=lambda e: type(e).__name__)
def test_back_pressure_is_a_503_saying_at_capacity(name: str, failure: Exception) -> None:
    raised = outcome(name, raising(failure))
    assert type(raised) is errors.Overloaded
    assert raised.status_code == 503 and raised.retry_after == 1
    assert raised.message == f"{WHO[name]} is at capacity; retry shortly."
    assert raised.__cause__ is None and raised.__suppress_context__  # Ray's text stays out of the chain


@pytest.mark.parametrize("name", [c[0] for c in CALLS])
@pytest.mark.parametrize("failure", GONE, ids=lambda e: type(e).__name__)
def test_a_dead_replica_or_node_is_a_503_saying_unavailable(name: str, failure: Exception) -> None:
    raised = outcome(name, raising(failure))
    assert type(raised) is errors.Overloaded
    assert raised.status_code == 503 and raised.headers()["Retry-After"] == "1"
    assert raised.message == f"{WHO[name]} is temporarily unavailable; retry shortly."
    # What a caller does with it: a model call falls back, a run is queued again, a batch line re-tried.
    assert raised.transient and raised.before_upstream


@pytest.mark.parametrize("failure", [*BUSY, *GONE], ids=lambda e: type(e).__name__)
def test_the_model_call_path_maps_the_same_failures_to_the_same_errors(failure: Exception) -> None:
    """model_calls' names for a model are this mapping's, for the subject ``Model '<name>'``."""
    from deployments import model_calls

    assert model_calls.WORKER_GONE is failures.WORKER_GONE
    mapped = failures.failure(failure, "Model 'm'")
    expected = model_calls.overloaded("m") if isinstance(failure, BackPressureError) else model_calls.unavailable("m")
    assert mapped is not None
    assert (type(mapped), mapped.message, mapped.retry_after) == (type(expected), expected.message,
                                                                  expected.retry_after)
    worker = outcome("workers", raising(failure))
    assert isinstance(worker, errors.Overloaded) and worker.message == expected.message


@pytest.mark.parametrize("failure", [
    RayTaskError("run", "Traceback: boom", ValueError("boom")),  # the shell's code raised: a bug
    RequestCancelledError("req-1"),  # the caller's request went away: not an answer to anyone
    ValueError("a bug on this side"),
], ids=lambda e: type(e).__name__)
def test_other_failures_are_not_mapped(failure: Exception) -> None:
    assert failures.failure(failure, "The task runner") is None
    raised = outcome("runner", raising(failure))
    assert raised is failure


def test_cancelling_the_caller_cancels_the_call() -> None:
    async def go() -> None:
        started = asyncio.Event()

        async def hang(*args: Any) -> Any:
            started.set()
            await asyncio.Event().wait()

        class Hanging:
            def __getattr__(self, name: str) -> Any:
                return type("M", (), {"remote": staticmethod(hang)})

        call = asyncio.create_task(RunnerClient(Hanging()).run("t", {}, payer=None))
        await started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(go())


def test_error_values_are_raised_and_results_returned() -> None:
    not_found = errors.RunNotFound("no such run", param="run_id")
    raised = outcome("runs", FakeHandle(lambda *a: not_found))
    assert raised is not_found
    assert outcome("runner", FakeHandle(lambda *a: {"output": {"label": "a"}})) is None

    async def result() -> dict[str, Any]:
        return await RunnerClient(FakeHandle(lambda *a: {"output": 1})).run("t", {}, payer="key_1")

    assert asyncio.run(result()) == {"output": 1}
    # Anything but a result or an error value is the runner's bug: a bare 500, the same on every path.
    odd = outcome("runner", FakeHandle(lambda *a: ["not", "a", "result"]))
    assert type(odd) is errors.PromptfleetError and odd.message == "Internal error."


# -- each client's handle calls fit its shell's methods ------------------------------------------


def handle_calls(client: type) -> list[tuple[str, int, list[str], int]]:
    """``(method, positional count, keyword names, line)`` of every ``self.handle.<method>.remote(…)``
    in ``client``'s class body."""
    source = Path(inspect.getsourcefile(client) or "")
    tree = ast.parse(source.read_text())
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == client.__name__)
    found = []
    for node in ast.walk(body):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "remote"
                and isinstance(node.func.value, ast.Attribute)
                and ast.unparse(node.func.value.value) == "self.handle"):
            assert not any(isinstance(a, ast.Starred) for a in node.args), ast.unparse(node)
            found.append((node.func.value.attr, len(node.args), [k.arg or "**" for k in node.keywords],
                          node.lineno))
    return found


@pytest.mark.parametrize("name", [c[0] for c in CALLS])
def test_every_handle_call_of_a_client_fits_its_shells_method(name: str) -> None:
    _, build, shell, _ = next(c for c in CALLS if c[0] == name)
    client = type(build(FakeHandle(lambda *a: None)))
    calls = handle_calls(client)
    public = [m for m, f in vars(client).items() if inspect.iscoroutinefunction(f) and not m.startswith("_")]
    assert len(calls) >= len(public) > 0, f"{client.__name__}: a method that calls nothing?"
    for method, positional, keywords, line in calls:
        target = getattr(shell, method, None)
        assert target is not None and not method.startswith("_"), f"{client.__name__}:{line}: {shell.__name__} " \
                                                                   f"has no method {method!r}"
        try:
            inspect.signature(target).bind(object(), *([object()] * positional), **dict.fromkeys(keywords))
        except TypeError as exc:
            raise AssertionError(f"{client.__name__}:{line}: {shell.__name__}.{method}: {exc}") from None


def test_the_signature_check_catches_a_call_that_does_not_fit() -> None:
    class Drifted(HandleClient):
        async def get(self) -> Any:
            return await self._answer(self.handle.get.remote("run_1", None, 0.0, "one too many"))

    (_, positional, keywords, _), = handle_calls(Drifted)
    with pytest.raises(TypeError):
        inspect.signature(TaskStore.get).bind(object(), *([object()] * positional), **dict.fromkeys(keywords))
