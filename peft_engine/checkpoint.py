"""Checkpoints that resume exactly, in safetensors and JSON only (never pickle).

A checkpoint directory holds:
- the method's weights as its output would hold them: a PEFT adapter (`adapter_config.json`,
  `adapter_model.safetensors`, loadable by peft as is) or `trained_weights.safetensors`;
- `optimizer.safetensors` (AdamW moments) + the optimizer's param groups in the state JSON;
- `rng.safetensors`: torch CPU and CUDA generator states;
- `best_adapter.safetensors`: the weights of the best evaluation so far, when there is one;
- `method_state.safetensors`: what a method keeps besides weights (AdaLoRA's importance
  scores), when it keeps anything;
- `tuneq_model.json`: the task head, labels and method spec (what rebuilds the model);
- `trainer_state.json`: step, data position, scheduler, fp16's loss scale, early-stopping
  state, Python and NumPy RNG states, counters. Written last: a directory without it is
  not a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from peft_engine.diagnostics import DiagnosticsState
from peft_engine.errors import SpecError
from peft_engine.methods.weights import MODEL_INFO_FILE, WeightsFormat
from peft_engine.spec_delivery import DELIVERY_FIELDS

if TYPE_CHECKING:
    from peft_engine.prepare import PreparedJob

STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "method_state.safetensors"

FORMAT_VERSION = 1


@dataclass
class EarlyStoppingState:
    best_loss: float | None = None
    best_step: int | None = None
    reference_loss: float | None = None  # the last improvement by at least min_delta
    evals_without_improvement: int = 0


@dataclass
class Timings:
    """Where the job's time went, summed over every attempt (result.json's "timings").

    `wall_seconds` is carried to each checkpoint, so a resumed run counts the time up to the
    checkpoint it resumed from (not the lost steps after it). Saving the output is in wall
    time but not in `checkpoint_seconds`."""

    load_seconds: float = 0.0  # spec, data, weights, and any checkpoint resumed from
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    wall_seconds: float = 0.0
    train_tokens: int = 0
    eval_tokens: int = 0
    evaluations: int = 0
    checkpoints: int = 0


@dataclass
class TrainerState:
    """Everything the loop needs, besides tensors, to carry on from `step`."""

    step: int
    epoch: int  # epoch the next step belongs to (data order is fixed by seed and epoch)
    total_steps: int
    trained_tokens: int = 0
    trained_loss_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    early_stopping: EarlyStoppingState = field(default_factory=EarlyStoppingState)
    initial_metrics: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    best_metrics: dict[str, float] = field(default_factory=dict)
    # the task's evaluation reports (per class, per entity type) of the last and best eval
    last_report: dict[str, Any] = field(default_factory=dict)
    best_report: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    grad_scaler: dict[str, Any] = field(default_factory=dict)  # fp16's loss scale; else {}
    # reduce_on_plateau: the learning-rate scale, the best eval loss, evaluations without gain
    plateau: dict[str, Any] = field(
        default_factory=lambda: {"scale": 1.0, "best": None, "bad_evals": 0}
    )
    spec_fingerprint: str = ""
    precision: str = ""  # the mode it trained in (precision.py); "" in older checkpoints
    # per-example losses: the training lines' and the last and best evaluations' worst
    diagnostics: DiagnosticsState = field(default_factory=DiagnosticsState)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerState:
        data = dict(data)
        data["early_stopping"] = EarlyStoppingState(**data["early_stopping"])
        data["diagnostics"] = DiagnosticsState.from_json(data.get("diagnostics") or {})
        legacy = {"train_seconds": data.pop("train_seconds")} if "train_seconds" in data else {}
        data["timings"] = Timings(**data.get("timings", legacy))
        return cls(**data)


def save_checkpoint(
    directory: Path,
    *,
    model: Any,
    weights: WeightsFormat,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    best_weights: dict[str, torch.Tensor] | None,
    method_state: dict[str, torch.Tensor] | None = None,
    model_info: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into `directory` atomically (a temporary sibling, then a rename)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights.save(model, tmp)
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file(_torch_rng_tensors(), tmp / "rng.safetensors")
    if best_weights is not None:
        save_file(best_weights, tmp / "best_adapter.safetensors")
    if method_state:
        tensors = {k: v.detach().contiguous().cpu() for k, v in method_state.items()}
        save_file(tensors, tmp / METHOD_STATE_FILE)
    if model_info is not None:
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(model_info, indent=2))
    payload = {
        "format_version": FORMAT_VERSION,
        **asdict(state),
        "optimizer_param_groups": groups,
        "python_rng": _python_rng_state(),
        "numpy_rng": _numpy_rng_state(),
    }
    (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    return directory


def spec_fingerprint(job: PreparedJob) -> str:
    """What must not change for a checkpoint to resume: the settings and the data order.

    Gradient checkpointing changes no figure, only memory, so it is left out; so is
    `precision` at its default, "auto", which keeps the fingerprints of checkpoints made
    before the field existed (they trained under "auto"). `resources` is left out too: the
    same global batch on any number of ranks is the same run, so a checkpoint of 2 ranks
    resumes on 1 and the other way round."""
    hyperparameters: set[str] = {"gradient_checkpointing"}
    if job.spec.hyperparameters.precision == "auto":
        hyperparameters.add("precision")
    if job.spec.hyperparameters.base_precision == "auto":  # likewise (QLoRA's "nf4" is kept)
        hyperparameters.add("base_precision")
    data = job.spec.model_dump_json(
        exclude={
            "training_file": True,
            "validation_file": True,
            "metadata": True,
            "resources": True,
            **dict.fromkeys(DELIVERY_FIELDS, True),  # export, serving, tracking: not training
            "hyperparameters": hyperparameters,
        }
    )
    order = ",".join(str(e.line) for e in job.train.examples)
    return hashlib.sha256(f"{data}|{order}".encode()).hexdigest()[:16]


def recorded_precision(directory: Path) -> str | None:
    """The compute mode the checkpoint in `directory` trained in (None: not recorded)."""
    try:
        return json.loads((directory / STATE_FILE).read_text()).get("precision") or None
    except (OSError, ValueError):
        return None  # load_checkpoint says what is wrong with it


def check_same_job(state: TrainerState, job: PreparedJob) -> None:
    if state.spec_fingerprint != spec_fingerprint(job):
        raise SpecError(
            "the checkpoint was made by a job with other settings or data; resuming it with "
            "this spec would not continue the same run",
            param="resume",
        )


@dataclass
class LoadedCheckpoint:
    state: TrainerState
    trained_weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor] | None
    method_state: dict[str, torch.Tensor] = field(default_factory=dict)


def load_checkpoint(
    directory: Path, *, optimizer: torch.optim.Optimizer, weights: WeightsFormat
) -> LoadedCheckpoint:
    """Read a checkpoint, restore the optimizer and every RNG; the caller loads the weights."""
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint (no {STATE_FILE})")
    payload = json.loads(state_path.read_text())
    if payload.pop("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format is not version {FORMAT_VERSION}")
    groups = payload.pop("optimizer_param_groups")
    _load_optimizer(optimizer, load_file(directory / "optimizer.safetensors"), groups)
    _restore_rng(
        load_file(directory / "rng.safetensors"),
        payload.pop("python_rng"),
        payload.pop("numpy_rng"),
    )
    best_path = directory / "best_adapter.safetensors"
    method_path = directory / METHOD_STATE_FILE
    return LoadedCheckpoint(
        state=TrainerState.from_json(payload),
        trained_weights=load_file(directory / weights.file),
        best_weights=load_file(best_path) if best_path.is_file() else None,
        method_state=load_file(method_path) if method_path.is_file() else {},
    )


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    state_dict = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().contiguous().cpu()
        for index, per_param in state_dict["state"].items()
        for name, value in per_param.items()
    }
    return tensors, state_dict["param_groups"]


def _load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _torch_rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = cuda_state
    return tensors


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": keys.tolist(),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _restore_rng(tensors: dict[str, torch.Tensor], python_rng: list, numpy_rng: dict) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        (
            numpy_rng["name"],
            np.array(numpy_rng["keys"], dtype=np.uint32),
            numpy_rng["pos"],
            numpy_rng["has_gauss"],
            numpy_rng["cached_gaussian"],
        )
    )
