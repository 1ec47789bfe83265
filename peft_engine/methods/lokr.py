"""LoKr (Yeh et al. 2023): the weight update as a Kronecker product of a small full matrix
and a low-rank one; very few parameters for large layers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import PEFT_TASK_TYPES, MethodSpec, TargetModules


class LokrMethod(MethodSpec):
    type: Literal["lokr"] = "lokr"
    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"


def build_lokr(model: Any, spec: LokrMethod, task: str) -> Any:
    from peft import LoKrConfig, get_peft_model

    config = LoKrConfig(
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
        type="lokr",
        spec=LokrMethod,
        build=build_lokr,
        tasks=("causal_lm",),
        default_learning_rate=lambda spec: 1e-3,
    )
)
