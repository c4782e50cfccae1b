"""TaskExecutor over the model call path with fake workers (no Ray): task fallbacks, billing, transience."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from deployments import errors
from deployments.config import OpenAIModel
from deployments.core.taskdefs import TaskDefinition
from deployments.model_calls import ModelCalls
from deployments.schemas import ChatReply, ModelCall
from deployments.store.records import UsageRecord
from deployments.task_executor import TRANSIENT, TaskExecutor
from tests.fakes.metering import Metered, metered
from tests.fakes.workers import FakeWorkers

MODELS = [OpenAIModel(provider="openai", name=n, base_url="http://127.0.0.1:1/v1", fallback_models=["z"])
          for n in ("m", "f", "z")]
TASK = TaskDefinition.model_validate({
    "name": "label", "description": "d", "model": "m", "fallback_models": ["f"],
    "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]},
    "prompt": "Label: {{ text }}",
})


class JsonWorkers(FakeWorkers):
    """Answers the task's JSON on success."""

    def chat(self, model: str, call: ModelCall) -> Any:
        answer = super().chat(model, call)

        async def labelled() -> Any:
            result = await answer
            if isinstance(result, ChatReply):
                result.completion["choices"][0]["message"]["content"] = json.dumps({"label": "a"})
            return result

        return labelled()


def test_a_task_falls_back_along_its_own_chain() -> None:
    workers = JsonWorkers({"m": [errors.UpstreamError("down")]})
    result = asyncio.run(TaskExecutor({"label": TASK}, ModelCalls(MODELS, workers)).execute("label", {"text": "x"}))
    assert workers.models_called() == ["m", "f"]  # the task's fallbacks, not the model's own ("z")
    assert result["model"] == "f" and result["output"] == {"label": "a"}


def test_a_worker_dying_mid_call_is_transient_so_a_queued_run_is_released_not_failed() -> None:
    from ray.exceptions import ActorUnavailableError

    dead = ActorUnavailableError("unavailable", None)
    workers = JsonWorkers({"m": [dead], "f": [dead]})
    with pytest.raises(errors.Overloaded) as caught:
        asyncio.run(TaskExecutor({"label": TASK}, ModelCalls(MODELS, workers)).execute("label", {"text": "x"}))
    assert isinstance(caught.value, TRANSIENT) and caught.value.retry_after == 1


def test_a_runs_calls_are_billed_to_its_key(tmp_path: Path) -> None:
    async def scenario(m: Metered) -> None:
        key = await m.key(token_budget=1000)
        workers = JsonWorkers()
        executor = TaskExecutor({"label": TASK}, ModelCalls(MODELS, workers, m.meter))
        result = await executor.execute("label", {"text": "x"}, key.key.id, True)
        (row,) = await m.usage(key)
        assert (row["model"], row["requests"], row["total_tokens"]) == ("m", 1, result["usage"]["total_tokens"])
        # Unmetered when nobody pays (authentication off, the admin).
        await executor.execute("label", {"text": "x"})
        assert len(await m.usage(key)) == 1 and (await m.usage(key))[0]["requests"] == 1
        # A spent budget: the run fails with 403 before any call.
        await m.store.record_usage([UsageRecord(key.key.id, "m", 1, 1000, 0)])
        m.meter.accounts.clear()
        calls_before = len(workers.calls)
        with pytest.raises(errors.PermissionDenied):
            await executor.execute("label", {"text": "x"}, key.key.id, True)
        assert len(workers.calls) == calls_before

    metered(tmp_path, scenario)
