"""LoHa (Hyeon-Woo et al. 2022): the weight update as a Hadamard product of two low-rank
products, more expressive than LoRA at the same rank."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import PEFT_TASK_TYPES, MethodSpec, TargetModules


class LohaMethod(MethodSpec):
    type: Literal["loha"] = "loha"
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"


def build_loha(model: Any, spec: LohaMethod, task: str) -> Any:
    from peft import LoHaConfig, get_peft_model

    config = LoHaConfig(
        r=spec.r,
        alpha=spec.alpha,
        rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout,
        target_modules=spec.target_modules,
        task_type=PEFT_TASK_TYPES[task],
    )
    return get_peft_model(model, config)


register(
    MethodDef(
        type="loha",
        spec=LohaMethod,
        build=build_loha,
        tasks=("causal_lm",),
        default_learning_rate=lambda spec: 2e-4,
    )
)
