"""LoHa (Hyeon-Woo et al. 2022): the weight update as a Hadamard product of two low-rank
products, more expressive than LoRA at the same rank."""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import TEXT_TASKS, LycorisSpec


class LohaMethod(LycorisSpec):
    type: Literal["loha"] = "loha"


def build_loha(model: Any, spec: LohaMethod, task: str) -> Any:
    from peft import LoHaConfig, get_peft_model

    return get_peft_model(model, LoHaConfig(**spec.peft_options(model, task)))


register(
    MethodDef(
        type="loha",
        spec=LohaMethod,
        build=build_loha,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 2e-4,
    )
)
