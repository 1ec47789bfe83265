"""Head only: the pretrained body stays frozen and only the new task head trains.

The cheapest baseline, and a linear probe of how much the body's features already know;
it needs a pooling that matches how the body was trained (mean pooling for sentence
encoders). The output holds the head's tensors by name (`load_trained` puts them back).
"""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods.common import HEAD_TASKS, MethodSpec, unfreeze_task_head
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import TRAINED_WEIGHTS


class HeadOnlyMethod(MethodSpec):
    type: Literal["head_only"] = "head_only"


def build_head_only(model: Any, spec: HeadOnlyMethod, task: str) -> Any:
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    unfreeze_task_head(model, task)
    return model


register(
    MethodDef(
        type="head_only",
        spec=HeadOnlyMethod,
        build=build_head_only,
        tasks=HEAD_TASKS,
        # a linear layer on frozen features: large steps are safe, and one epoch of 20,000
        # SST-2 sentences needs them (bench/quality.py: 80.7% at 5e-3)
        default_learning_rate=lambda spec: 5e-3,
        weights=TRAINED_WEIGHTS,
    )
)
