"""The learning rates "auto" resolves to: the method's (per task), and a new task head's."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_engine.methods import METHODS
from peft_engine.methods.common import HEAD_TASKS

if TYPE_CHECKING:
    from peft_engine.spec import JobSpec


def auto_learning_rate(spec: JobSpec) -> float:
    """The method's rate: its classification-task rate on those tasks, where it has one."""
    method = METHODS[spec.method.type]
    if spec.task in HEAD_TASKS and method.head_task_learning_rate is not None:
        return method.head_task_learning_rate(spec.method)
    return method.default_learning_rate(spec.method)


# The lowest rate "auto" gives a new task head next to a body that trains: a fresh linear
# layer needs large steps, while the features under it move (bench/quality.py).
_FRESH_HEAD_LR = 2e-3


def head_learning_rate(spec: JobSpec, learning_rate: float) -> float | None:
    """The new task head's rate: as asked, or no lower than `_FRESH_HEAD_LR`."""
    hp = spec.hyperparameters
    if spec.task not in HEAD_TASKS or spec.method.type == "head_only":
        return None
    if hp.head_learning_rate != "auto":
        return hp.head_learning_rate
    return max(learning_rate, _FRESH_HEAD_LR)
