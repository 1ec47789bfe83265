"""(IA)³ (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward
activations; the fewest trainable parameters of the adapter methods."""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import TEXT_TASKS, MethodSpec, peft_task_options


class Ia3Method(MethodSpec):
    type: Literal["ia3"] = "ia3"
    # Targets are peft's choice for the model family: keys, values, the FFN down projection.


def build_ia3(model: Any, spec: Ia3Method, task: str) -> Any:
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(**peft_task_options(task)))


register(
    MethodDef(
        type="ia3",
        spec=Ia3Method,
        build=build_ia3,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 3e-3,  # scaling vectors need large steps
    )
)
