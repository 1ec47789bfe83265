"""The learning-rate schedule: linear warmup, then linear, cosine or constant decay.

`lr_multiplier` is a pure function of the step; `reduce_on_plateau` multiplies it by a
`PlateauScale` that evaluations lower. A checkpoint keeps only the scheduler's counters and
the plateau's record: the schedule itself is rebuilt from the spec.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft_engine.checkpoint import TrainerState


def lr_multiplier(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The learning rate at `step` (0-based) as a fraction of the peak: warmup, then decay."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine


class PlateauScale:
    """reduce_on_plateau: the factor on the scheduled learning rate, lowered on plateaus.

    Its state lives in `TrainerState.plateau` (scale, best loss, evaluations without
    improvement), so a resumed run goes on with the same learning rate.
    """

    def __init__(self) -> None:
        self.scale = 1.0

    def update(self, state: TrainerState, hp: Any) -> bool:
        """Record an evaluation; True when it lowered the learning rate."""
        rule, record = hp.reduce_on_plateau, state.plateau
        loss = state.last_eval["eval_loss"]
        best = record.get("best")
        if best is None or loss < best * (1.0 - rule.threshold):
            record["best"], record["bad_evals"] = loss, 0
            return False
        record["bad_evals"] += 1
        if record["bad_evals"] < rule.patience:
            return False
        record["bad_evals"] = 0
        lowered = max(rule.min_lr_ratio, self.scale * rule.factor)
        changed = lowered < self.scale
        self.scale = record["scale"] = lowered
        return changed


def lr_scheduler(
    optimizer: torch.optim.Optimizer, hp: Any, plateau: PlateauScale
) -> torch.optim.lr_scheduler.LambdaLR:
    """The spec's schedule on `optimizer`, scaled by `plateau` (1 unless reduce_on_plateau)."""
    schedule = partial(
        lr_multiplier, kind=hp.lr_scheduler, warmup=hp.warmup_steps, total=hp.total_steps
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step) * plateau.scale)


def scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    # The schedule itself is a function of the spec; only its counters go in the checkpoint.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(
    scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]
) -> None:
    """Put back the counters `scheduler_state` kept, leaving the rebuilt schedule in place."""
    groups = len(scheduler.optimizer.param_groups)
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * groups})
