"""The catalogue of fine-tuning methods: each module holds a spec, a builder, a registration.

Importing this package stays cheap (no torch, no peft) because the API validates specs with
it; builders import what they need when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from peft_engine.methods.weights import PEFT_ADAPTER, WeightsFormat


@dataclass(frozen=True)
class MethodDef:
    type: str
    spec: type[BaseModel]
    # build(model, spec, task) -> the model with the method applied, ready to train
    build: Callable[[Any, Any, str], Any]
    tasks: tuple[str, ...]
    # The learning rate "auto" resolves to: methods with few parameters want larger steps.
    default_learning_rate: Callable[[Any], float]
    # How its trained weights are saved and restored: a PEFT adapter unless said otherwise.
    weights: WeightsFormat = PEFT_ADAPTER
    # Model families (config.json's model_type) it works on; None: every family.
    families: tuple[str, ...] | None = None
    # Methods that put virtual tokens in front of the input cannot pack examples in one row.
    needs_padding: bool = False
    # trainer(model, spec, hyperparameters, task) -> a MethodTrainer, for methods that act during
    # training (a rank budget, an unfreezing schedule, per-group learning rates).
    trainer: Callable[[Any, Any, Any], Any] | None = None


METHODS: dict[str, MethodDef] = {}


def register(method: MethodDef) -> MethodDef:
    METHODS[method.type] = method
    return method


def method_for(method_type: str) -> MethodDef:
    return METHODS[method_type]


# Each module registers itself on import.
from peft_engine.methods import (  # noqa: E402,F401
    adalora,
    bitfit,
    bottleneck,
    full,
    head_only,
    ia3,
    layerwise,
    loha,
    lokr,
    lora,
    oft,
    prompt_learning,
    vera,
)
