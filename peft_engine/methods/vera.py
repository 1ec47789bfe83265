"""VeRA (Kopiczko et al. 2024): frozen random low-rank matrices shared by every layer, with
only two small scaling vectors per layer trained."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peft_engine.methods.common import TEXT_TASKS, PeftMethodSpec, TargetModules, build_peft
from peft_engine.methods.registry import MethodDef, register


class VeraMethod(PeftMethodSpec):
    peft_config = "VeraConfig"
    peft_fields = {"r": "r", "vera_dropout": "dropout", "d_initial": "d_initial"}

    type: Literal["vera"] = "vera"
    r: int = Field(256, ge=1, le=4096)  # cheap: the random matrices are shared, not trained
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    d_initial: float = Field(0.1, gt=0.0, le=10.0)
    target_modules: TargetModules = "all-linear"


register(
    MethodDef(
        type="vera",
        spec=VeraMethod,
        build=build_peft,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 4e-3,  # only scaling vectors train
    )
)
