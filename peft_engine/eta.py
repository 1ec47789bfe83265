"""The live ETA: what is left of the job, priced with this job's own measurements.

What is left after a step is logged: the remaining optimizer steps (their tokens, known
from the data, when the loop gives them), the periodic evaluations
still due (this step's included: it is evaluated after its metrics are logged), the final
evaluation of the kept weights on the whole validation set (when the periodic ones use a
sample), the checkpoints still due, and writing the output. Each is priced by what the run
has measured so far; what it has not measured yet is predicted: an evaluation token from a
trained token (EVAL_COST_PER_TOKEN), a checkpoint (and the output) as one step's time.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_engine.checkpoint import Timings
from peft_engine.eval_plan import EVAL_COST_PER_TOKEN


@dataclass(frozen=True)
class RemainingWork:
    steps: int
    evaluations: int  # periodic evaluations still due
    eval_tokens_each: int  # tokens one periodic evaluation goes through
    final_eval_tokens: int  # the kept weights' whole-set evaluation; 0 when there is none
    checkpoints: int
    # tokens the remaining steps train on (known from the data: the epochs' tokens less those
    # trained); None: priced by the step instead
    train_tokens: int | None = None


@dataclass(frozen=True)
class Rates:
    """Seconds per unit, as measured (None where nothing has been measured yet)."""

    seconds_per_step: float
    seconds_per_train_token: float
    seconds_per_eval_token: float | None = None
    seconds_per_checkpoint: float | None = None

    @classmethod
    def measured(cls, timings: Timings, steps: int) -> Rates:
        """The rates of a run that has done `steps` (> 0) steps and the work in `timings`."""
        return cls(
            seconds_per_step=timings.train_seconds / steps,
            seconds_per_train_token=timings.train_seconds / max(1, timings.train_tokens),
            seconds_per_eval_token=timings.eval_seconds / timings.eval_tokens
            if timings.eval_tokens
            else None,
            seconds_per_checkpoint=timings.checkpoint_seconds / timings.checkpoints
            if timings.checkpoints
            else None,
        )


def remaining_work(
    *,
    step: int,
    total_steps: int,
    eval_every: int | None,
    checkpoint_every: int,
    eval_tokens_each: int,
    final_eval_tokens: int,
    train_tokens: int | None = None,
) -> RemainingWork:
    """What is left once step `step`'s training is done (its evaluation and checkpoint not)."""
    evaluations = 0
    if eval_every is not None:
        # multiples of eval_every in [step, total_steps], and the last step when not one
        evaluations = total_steps // eval_every - (step - 1) // eval_every
        evaluations += 1 if total_steps % eval_every else 0
    # multiples of checkpoint_every in [step, total_steps): after the last step, the output
    checkpoints = (total_steps - 1) // checkpoint_every - (step - 1) // checkpoint_every
    return RemainingWork(
        steps=total_steps - step,
        train_tokens=None if train_tokens is None else max(0, train_tokens),
        evaluations=evaluations,
        eval_tokens_each=eval_tokens_each if eval_every is not None else 0,
        final_eval_tokens=final_eval_tokens if eval_every is not None else 0,
        checkpoints=max(0, checkpoints),
    )


def eta_seconds(work: RemainingWork, rates: Rates) -> float:
    """Seconds until the output is written."""
    per_eval_token = rates.seconds_per_eval_token
    if per_eval_token is None:
        per_eval_token = rates.seconds_per_train_token * EVAL_COST_PER_TOKEN
    per_checkpoint = rates.seconds_per_checkpoint
    if per_checkpoint is None:
        per_checkpoint = rates.seconds_per_step
    eval_tokens = work.evaluations * work.eval_tokens_each + work.final_eval_tokens
    # Steps differ in tokens (examples differ in length): pricing the tokens left, rather
    # than the steps, keeps a first step of short examples from foretelling a short job.
    train = (
        work.steps * rates.seconds_per_step
        if work.train_tokens is None
        else work.train_tokens * rates.seconds_per_train_token
    )
    return (
        train
        + eval_tokens * per_eval_token
        + work.checkpoints * per_checkpoint
        + per_checkpoint  # writing the output: about one checkpoint's saving
    )
