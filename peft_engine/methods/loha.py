"""LoHa (Hyeon-Woo et al. 2022): the weight update as a Hadamard product of two low-rank
products, more expressive than LoRA at the same rank."""

from __future__ import annotations

from typing import Literal

from peft_engine.methods.common import TEXT_TASKS, LycorisSpec, build_peft
from peft_engine.methods.registry import MethodDef, register


class LohaMethod(LycorisSpec):
    peft_config = "LoHaConfig"

    type: Literal["loha"] = "loha"


register(
    MethodDef(
        type="loha",
        spec=LohaMethod,
        build=build_peft,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 2e-4,
        # as LoRA's on a classification task (bench/quality.py, SST-2 4k: 2e-4 76.4, 1e-3 80.9)
        head_task_learning_rate=lambda spec: 1e-3,
    )
)
