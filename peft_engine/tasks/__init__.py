"""The tasks the engine trains, chosen by name (and for a job, by its method's objective
too); what each supplies is `tasks.base.Task`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peft_engine.data.formats import PREFERENCE_OBJECTIVES

if TYPE_CHECKING:
    from peft_engine.spec import JobSpec
    from peft_engine.tasks.base import Task


def task_of(spec: JobSpec) -> Task:
    """The task a job trains: its task's, or preference tuning for a preference objective."""
    if spec.method.objective.type in PREFERENCE_OBJECTIVES:
        from peft_engine.tasks.preference import PREFERENCE

        return PREFERENCE
    return task_for(spec.task)


def task_for(name: str) -> Task:
    """The task's implementation; imported on first use (they need torch)."""
    if name == "causal_lm":
        from peft_engine.tasks.causal_lm import CAUSAL_LM

        return CAUSAL_LM
    if name == "seq_classification":
        from peft_engine.tasks.classification import SEQ_CLASSIFICATION

        return SEQ_CLASSIFICATION
    if name == "token_classification":
        from peft_engine.tasks.token_classification import TOKEN_CLASSIFICATION

        return TOKEN_CLASSIFICATION
    if name == "image_classification":
        from peft_engine.tasks.image import IMAGE_CLASSIFICATION

        return IMAGE_CLASSIFICATION
    raise ValueError(f"unknown task {name!r}")
