"""What the peft-based method modules share: strict spec models, targets, task types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# A method's target layers: "all-linear" (every linear layer but the output head) or names.
TargetModules = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM"}


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
