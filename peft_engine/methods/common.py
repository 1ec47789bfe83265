"""What the peft-based method modules share: strict spec models, targets, task types."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# A method's target layers: "all-linear" (every linear layer but the output head) or names.
TargetModules = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM"}


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LycorisSpec(MethodSpec):
    """LoHa and LoKr, the LyCORIS pair: a structured low-rank update with the same options."""

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"

    def peft_options(self, task: str) -> dict[str, Any]:
        return {
            "r": self.r,
            "alpha": self.alpha,
            "rank_dropout": self.rank_dropout,
            "module_dropout": self.module_dropout,
            "target_modules": self.target_modules,
            "task_type": PEFT_TASK_TYPES[task],
        }
