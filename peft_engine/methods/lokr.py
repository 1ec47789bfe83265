"""LoKr (Yeh et al. 2023): the weight update as a Kronecker product of a small full matrix
and a low-rank one; very few parameters for large layers."""

from __future__ import annotations

from typing import Literal

from peft_engine.methods.common import TEXT_TASKS, LycorisSpec, build_peft
from peft_engine.methods.registry import MethodDef, register


class LokrMethod(LycorisSpec):
    peft_config = "LoKrConfig"

    type: Literal["lokr"] = "lokr"


register(
    MethodDef(
        type="lokr",
        spec=LokrMethod,
        build=build_peft,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 1e-3,
    )
)
