"""The registry of fine-tuning methods: what a method is (`MethodDef`) and where it is found.

Each method module registers its `MethodDef` when imported; `peft_engine.methods` imports
them all. This module imports neither torch nor peft, so the API can validate specs with it.
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
    # Its rate on a classification task (a new head on an encoder body), where that differs:
    # bench/quality.py measured these on all-MiniLM-L6-v2. None: default_learning_rate.
    head_task_learning_rate: Callable[[Any], float] | None = None
    # How its trained weights are saved and restored: a PEFT adapter unless said otherwise.
    weights: WeightsFormat = PEFT_ADAPTER
    # Model families (config.json's model_type) it works on; None: every family.
    families: tuple[str, ...] | None = None
    # Methods that put virtual tokens in front of the input cannot pack examples in one row.
    needs_padding: bool = False
    # The model it builds runs as the base model exactly with its adapter disabled (peft's
    # `disable_adapter`): preference objectives use that as their reference model.
    disables_adapter: bool = False
    # trainer(model, spec, hyperparameters, task) -> a MethodTrainer, for methods that act during
    # training (a rank budget, an unfreezing schedule, per-group learning rates).
    trainer: Callable[[Any, Any, Any], Any] | None = None


# Every registered method by type, in the order they registered (the API lists them so).
METHODS: dict[str, MethodDef] = {}


def register(method: MethodDef) -> MethodDef:
    """Add a method; a second method of the same type is an error, not a silent replacement."""
    if method.type in METHODS:
        raise ValueError(f"a method of type {method.type!r} is already registered")
    METHODS[method.type] = method
    return method


def method_for(method_type: str) -> MethodDef:
    return METHODS[method_type]
