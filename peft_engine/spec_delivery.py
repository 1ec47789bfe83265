"""The job spec's parts about what happens to the result (DESIGN §5): how it is exported,
which serving engine it must load into, and where the run is tracked.

None of them changes the training: they are left out of a checkpoint's fingerprint, so a
job resumes whatever they say. Tracking servers' addresses are the operator's settings,
never the request's: a job names only an experiment or a project.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field

from peft_engine.errors import SpecError


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


# -- merged export: which trained models merge into one plain model (export.py builds it) --

# peft methods whose adapters peft folds into the base weights (`merge_and_unload`): LoRA
# (DoRA, PiSSA and OLoRA outputs included: the output is a plain adapter on the original
# base), AdaLoRA, IA3, LoHa, LoKr, OFT, VeRA.
PEFT_MERGEABLE = ("lora", "adalora", "ia3", "loha", "lokr", "oft", "vera")
# Methods that train the model's own parameters: the output is already a whole model.
WHOLE_WEIGHTS = ("full", "bitfit", "layerwise_unfreeze", "head_only")
_PROMPT = (
    "learns virtual tokens put in front of every input, not a change to any weight: there is "
    "nothing to merge; serve the adapter with peft"
)
MERGE_REFUSALS = {
    "prompt_tuning": _PROMPT,
    "p_tuning": _PROMPT,
    "prefix_tuning": _PROMPT,
    "bottleneck_adapter": "adds new layers (bottleneck adapters) between the model's own: "
    "no weight of the base model holds them, so plain transformers cannot load the result",
}


def merge_refusal(task: str, method_type: str) -> str | None:
    """Why a job of `task` trained with `method_type` cannot be exported merged; None if it
    can. Only causal LMs: tuneq's classification heads are its own modules (mean or last
    token pooling, a head on a body) that no transformers Auto class rebuilds exactly."""
    if task != "causal_lm":
        return (
            f"a merged export is for causal_lm only: {task}'s head is tuneq's own module "
            "(peft_engine/models/heads.py), which no transformers Auto class loads; load the "
            "adapter with peft_engine.load_trained instead"
        )
    if method_type in PEFT_MERGEABLE or method_type in WHOLE_WEIGHTS:
        return None
    reason = MERGE_REFUSALS.get(method_type, "has no merge into the base weights")
    return f"method {method_type!r} {reason}"


def check_export_spec(spec: Any) -> None:
    """`export.merged: true` for what cannot merge: refused at submit, with the reason."""
    if spec.export is None or not spec.export.merged:
        return
    reason = merge_refusal(spec.task, spec.method.type)
    if reason is not None:
        raise SpecError(reason, param="export.merged")
