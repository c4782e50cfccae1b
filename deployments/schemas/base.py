"""The two kinds of body: OpenAI-compatible (unknown fields tolerated) and our own (unknown fields refused)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")


class OwnBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
