"""AdaLoRA (Zhang et al. 2023): LoRA whose rank budget moves to the layers that need it.

Each adapted layer starts at rank `init_r`, as an SVD-like triplet P·Λ·Q. After `tinit`
warm-up steps the lowest-importance singular values are masked step by step (every
`deltaT` steps) until the average rank is `target_r`; the last `tfinal` steps train with the
final ranks fixed. An orthogonality penalty keeps P and Q near orthogonal. peft does all of
it (`update_and_allocate` after each optimizer step); the engine adds the penalty to the
loss (peft adds it only when the model computes its own loss, which ours do not) and keeps
the importance scores in checkpoints, so a resumed job allocates exactly as an
uninterrupted one. The output is a PEFT adapter with its final rank pattern.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from peft_engine.errors import SpecError
from peft_engine.methods.common import (
    TEXT_TASKS,
    MethodTrainer,
    PeftMethodSpec,
    TargetModules,
    build_peft,
)
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import WeightsFormat, peft_restore, peft_save, peft_state

# peft checks the schedule when the config is made, before the job's length is known; the
# trainer sets the real length.
_PLACEHOLDER_TOTAL = 1_000_000


class AdaLoraMethod(PeftMethodSpec):
    peft_config = "AdaLoraConfig"
    peft_fields = {
        "init_r": "init_r",
        "target_r": "target_r",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "deltaT": "delta_t",
        "beta1": "beta1",
        "beta2": "beta2",
        "orth_reg_weight": "orth_reg_weight",
    }
    # The schedule's phases are set by the trainer, once the job's length is known.
    peft_fixed = {"tinit": 0, "tfinal": 0, "total_step": _PLACEHOLDER_TOTAL}

    type: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, le=1024)
    target_r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"
    # Fractions of the job's steps: warm-up before budgeting, and final steps at fixed ranks.
    warmup_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    final_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    delta_t: int = Field(1, ge=1, le=10_000)  # steps between two budget updates
    beta1: float = Field(0.85, gt=0.0, lt=1.0)
    beta2: float = Field(0.85, gt=0.0, lt=1.0)
    orth_reg_weight: float = Field(0.5, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _target_below_init(self) -> AdaLoraMethod:
        # peft's budget masks init_r − target_r triplets a layer on average: none to mask
        # fails inside training (torch.kthvalue), so it is refused here, before any weights
        if self.target_r >= self.init_r:
            raise SpecError(
                f"must be smaller than init_r ({self.init_r}): AdaLoRA moves rank from init_r "
                "down to target_r; for a fixed rank use lora",
                param="method.target_r",
            )
        return self


def build_adalora(model: Any, spec: AdaLoraMethod, task: str) -> Any:
    return build_peft(model, spec, task)


class AdaLoraTrainer(MethodTrainer):
    _KINDS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __init__(self, model: Any, spec: AdaLoraMethod, hp: Any, task: str) -> None:
        self.model = model
        tuner = model.base_model
        self.config = tuner.peft_config[tuner.trainable_adapter_name]
        total = hp.total_steps
        tinit = math.floor(spec.warmup_fraction * total)
        tfinal = math.floor(spec.final_fraction * total)
        if tinit >= total - tfinal:  # too short a job for the fractions: keep a budget phase
            tinit, tfinal = 0, 0
        self.config.total_step, self.config.tinit, self.config.tfinal = total, tinit, tfinal
        tuner.rankallocator.set_total_step(total)
        self.weight = spec.orth_reg_weight

    def after_optimizer_step(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def extra_loss(self) -> Any:
        """peft's orthogonal regularisation: mean over P and Q of ||PᵀP − I||_F."""
        import torch

        if self.weight == 0:
            return None
        adapter = self.model.base_model.trainable_adapter_name
        total, count = None, 0
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and adapter in name and p.numel():
                cov = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                term = torch.norm(cov - eye, p="fro")
                total = term if total is None else total + term
                count += 1
        return None if total is None else self.weight * total / count

    def state(self) -> dict[str, Any]:
        import torch

        allocator = self.model.base_model.rankallocator
        tensors = {
            f"{kind}.{name}": value
            for kind in self._KINDS
            for name, value in getattr(allocator, kind).items()
        }
        for name, mask in (self.config.rank_pattern or {}).items():
            tensors[f"rank_pattern.{name}"] = torch.tensor(mask, dtype=torch.bool)
        return tensors

    def load_state(self, tensors: dict[str, Any]) -> None:
        allocator = self.model.base_model.rankallocator
        pattern: dict[str, list[bool]] = {}
        for key, value in tensors.items():
            kind, name = key.split(".", 1)
            if kind == "rank_pattern":
                pattern[name] = value.tolist()
            else:
                getattr(allocator, kind)[name] = value
        if pattern:
            self.config.rank_pattern = pattern


def _full_size(action: Any) -> Any:
    """Run `action(model, ...)` with the rank pattern set aside: checkpoints and the best
    weights keep every triplet (masked ones are zero), so restoring them never has to
    resize the layers the optimizer holds."""

    def run(model: Any, *args: Any) -> Any:
        config = model.peft_config[model.base_model.trainable_adapter_name]
        pattern, config.rank_pattern = config.rank_pattern, None
        try:
            return action(model, *args)
        finally:
            config.rank_pattern = pattern

    return run


# The output is peft's own save: the final rank pattern, loadable by PeftModel.from_pretrained.
ADALORA_ADAPTER = WeightsFormat(
    "adapter_model.safetensors",
    state=_full_size(peft_state),
    restore=_full_size(peft_restore),
    save=_full_size(peft_save),
    export=peft_save,
)


register(
    MethodDef(
        type="adalora",
        spec=AdaLoraMethod,
        build=build_adalora,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 5e-4,
        # as LoRA's on a classification task (bench/quality.py, SST-2 4k: 5e-4 77.1, 1e-3 80.9)
        head_task_learning_rate=lambda spec: 1e-3,
        trainer=lambda model, spec, hp, task: AdaLoraTrainer(model, spec, hp, task),
        weights=ADALORA_ADAPTER,
    )
)
