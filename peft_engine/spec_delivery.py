"""The job spec's parts about what happens to the result (DESIGN §5): how it is exported,
which serving engine it must load into, and where the run is tracked.

None of them changes the training: they are left out of a checkpoint's fingerprint, so a
job resumes whatever they say. Tracking servers' addresses are the operator's settings,
never the request's: a job names only an experiment or a project.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExportSpec(_Strict):
    # The base model with the adapter merged into it, as safetensors shards with config,
    # tokenizer and chat template, written by the worker after training (also on demand:
    # POST /jobs/{id}/exports); in `dtype`. Methods whose weights cannot merge are refused.
    merged: bool = False
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"


class ServingSpec(_Strict):
    # The serving engine the result must load into: checked at POST /jobs (what vLLM's LoRA
    # serving cannot load is refused before any GPU time is spent).
    target: Literal["vllm"]


TrackingName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")]


class MlflowIntegration(_Strict):
    # The run logged to the operator's MLflow tracking server (TUNEQ_MLFLOW_TRACKING_URI).
    type: Literal["mlflow"]
    experiment: TrackingName


class WandbIntegration(_Strict):
    # The run logged to Weights & Biases (the operator's TUNEQ_WANDB_* settings).
    type: Literal["wandb"]
    project: TrackingName


Integration = Annotated[
    Union[MlflowIntegration, WandbIntegration],  # noqa: UP007
    Discriminator("type"),
]
Integrations = Annotated[list[Integration], Field(max_length=4)]

# JobSpec's fields that say what happens to the result, not how it is trained.
DELIVERY_FIELDS = ("export", "serving", "integrations")
