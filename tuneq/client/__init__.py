"""The Python SDK of tuneq's HTTP API, which the `tuneq files|jobs|models` commands use.

Torch-free and light: importing it loads httpx, not the training stack.
"""

from tuneq.client.client import Client
from tuneq.client.errors import MissingSetting, ProblemItem, TuneqAPIError
from tuneq.client.follow import JobFollow
from tuneq.client.transport import RetryPolicy
from tuneq.client.types import (
    Artifact,
    Checkpoint,
    Diagnostics,
    Estimate,
    Event,
    File,
    FileDeleted,
    Job,
    Metrics,
    Model,
    Page,
)

__all__ = [
    "Artifact",
    "Checkpoint",
    "Client",
    "Diagnostics",
    "Estimate",
    "Event",
    "File",
    "FileDeleted",
    "Job",
    "JobFollow",
    "Metrics",
    "MissingSetting",
    "Model",
    "Page",
    "ProblemItem",
    "RetryPolicy",
    "TuneqAPIError",
]
