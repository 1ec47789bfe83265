"""What `GET /quota` answers: a team's limits, and its use of each."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class QuotaLimits(BaseModel):
    running_jobs: int | None = Field(description="jobs running at once; more wait (null: none)")
    queued_jobs: int | None = Field(description="jobs queued or paused (null: no limit)")
    stored_bytes: int | None = Field(description="bytes of files and artifacts (null: no limit)")
    gpu_seconds: int | None = Field(description="GPU-seconds in the window (null: no limit)")
    gpu_window_seconds: int = Field(description="the GPU-seconds quota's rolling window")


class QuotaUsage(BaseModel):
    running_jobs: int
    queued_jobs: int
    stored_bytes: int
    gpu_seconds: int = Field(description="in the rolling window")


class QuotaPublic(BaseModel):
    object: Literal["quota"] = "quota"
    team: str
    limits: QuotaLimits
    usage: QuotaUsage
