"""(IA)³ (Liu et al. 2022): learned vectors that rescale keys, values and feed-forward
activations; the fewest trainable parameters of the adapter methods."""

from __future__ import annotations

from typing import Literal

from peft_engine.methods.common import TEXT_TASKS, PeftMethodSpec, build_peft
from peft_engine.methods.registry import MethodDef, register


class Ia3Method(PeftMethodSpec):
    # Targets are peft's choice for the model family: keys, values, the FFN down projection.
    peft_config = "IA3Config"

    type: Literal["ia3"] = "ia3"


register(
    MethodDef(
        type="ia3",
        spec=Ia3Method,
        build=build_peft,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 3e-3,  # scaling vectors need large steps
        # larger still on a classification task (bench/quality.py, SST-2 4k: 3e-3 77.7, 1e-2 80.3)
        head_task_learning_rate=lambda spec: 1e-2,
    )
)
