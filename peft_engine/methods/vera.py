"""VeRA (Kopiczko et al. 2024): frozen random low-rank matrices shared by every layer, with
only two small scaling vectors per layer trained."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import (
    TEXT_TASKS,
    MethodSpec,
    TargetModules,
    peft_targets,
    peft_task_options,
)


class VeraMethod(MethodSpec):
    type: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, le=4096)  # cheap: the random matrices are shared, not trained
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = Field(0.1, gt=0.0, le=10.0)
    target_modules: TargetModules = "all-linear"


def build_vera(model: Any, spec: VeraMethod, task: str) -> Any:
    from peft import VeraConfig, get_peft_model

    config = VeraConfig(
        r=spec.r,
        vera_dropout=spec.dropout,
        d_initial=spec.d_initial,
        target_modules=peft_targets(model, spec.target_modules, task),
        **peft_task_options(task),
    )
    return get_peft_model(model, config)


register(
    MethodDef(
        type="vera",
        spec=VeraMethod,
        build=build_vera,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 4e-3,  # only scaling vectors train
    )
)
