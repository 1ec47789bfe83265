"""Full fine-tuning: every parameter trains. The baseline the other methods are measured
against; its output is the trained weights themselves (`load_trained` reads them)."""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods.common import ALL_TASKS, MethodSpec
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import TRAINED_WEIGHTS


class FullMethod(MethodSpec):
    type: Literal["full"] = "full"


def build_full(model: Any, spec: FullMethod, task: str) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


register(
    MethodDef(
        type="full",
        spec=FullMethod,
        build=build_full,
        tasks=ALL_TASKS,
        default_learning_rate=lambda spec: 2e-5,
        # a small encoder under a new head: the BERT recipe's upper rate
        head_task_learning_rate=lambda spec: 5e-5,
        weights=TRAINED_WEIGHTS,
    )
)
