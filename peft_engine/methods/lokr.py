"""LoKr (Yeh et al. 2023): the weight update as a Kronecker product of a small full matrix
and a low-rank one; very few parameters for large layers."""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import TEXT_TASKS, LycorisSpec


class LokrMethod(LycorisSpec):
    type: Literal["lokr"] = "lokr"


def build_lokr(model: Any, spec: LokrMethod, task: str) -> Any:
    from peft import LoKrConfig, get_peft_model

    return get_peft_model(model, LoKrConfig(**spec.peft_options(model, task)))


register(
    MethodDef(
        type="lokr",
        spec=LokrMethod,
        build=build_lokr,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 1e-3,
    )
)
