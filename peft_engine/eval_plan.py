"""The evaluation plan: how often a job evaluates, and on how many validation examples.

`resolve_spec` asks `plan_evaluation` for the cadence (`eval_every_steps`) and the fixed
validation sample (`eval_sample_size`) when the spec leaves them to the engine, so that the
evaluations cost at most the spec's `eval_budget` of the training compute. The estimate
(estimate.py) and the live ETA (eta.py) price evaluations with the same rules: an evaluated
token costs `EVAL_COST_PER_TOKEN` of a trained one, and `periodic_evaluations` counts the
evaluations a cadence runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# An evaluation token costs about a third of a trained one: a forward pass, no backward.
EVAL_COST_PER_TOKEN = 1 / 3
# Periodic evaluations the plan aims for over a job (fewer when the budget is tight, never
# fewer than the minimum), and the smallest sample it evaluates on.
_MOST_EVALS, _WHOLE_SET_FEWEST_EVALS, _SAMPLED_EVALS, _FEWEST_EVALS = 10, 4, 5, 2
_SMALLEST_SAMPLE = 32


@dataclass(frozen=True)
class EvaluationPlan:
    every_steps: int | None  # None: no validation data, no evaluation
    sample_size: int | None  # None: the whole validation set
    # with a sample: the kept weights evaluated on the whole set at the end
    final_whole_set: bool = True


def plan_evaluation(
    *,
    total_steps: int,
    train_tokens: float,
    n_validation: int,
    validation_mean_tokens: float,
    eval_budget: float,
    explicit_every: int | None,
) -> EvaluationPlan:
    """How often to evaluate and on how many validation examples, so that evaluation (the
    base model's, one per `every_steps` and the last step's, and with a sample the kept
    weights' pass over the whole set at the end) costs at most `eval_budget` of the job's
    training compute.

    An explicit cadence is obeyed, on the whole set. Otherwise: the most evaluations, from 10
    down to 4, that fit with the whole set; else 5 (down to 2) on the largest fixed sample that
    fits beside a final pass over the whole set; else, when that pass alone would go over the
    budget, 5 (down to 2) on the largest sample that fits, with no final pass (the kept
    weights' numbers are the sample's: raise eval_budget for whole-set numbers). The sample
    is never under 32 examples (or the whole set when it is smaller), even when that goes over
    the budget.
    """
    if n_validation == 0:
        return EvaluationPlan(None, None)
    if explicit_every is not None:
        return EvaluationPlan(explicit_every, None)
    cost_per_example = max(1.0, validation_mean_tokens) * EVAL_COST_PER_TOKEN
    affordable = eval_budget * train_tokens / cost_per_example  # examples evaluated in all

    def every(evals: int) -> int:
        return math.ceil(total_steps / max(1, min(evals, total_steps)))

    def n_evals(evals: int) -> int:  # with the base model's
        return periodic_evaluations(total_steps, every(evals)) + 1

    for evals in range(_MOST_EVALS, _WHOLE_SET_FEWEST_EVALS - 1, -1):
        if n_evals(evals) * n_validation <= affordable:
            return EvaluationPlan(every(evals), None)
    smallest = min(n_validation, _SMALLEST_SAMPLE)
    for final, left in ((True, affordable - n_validation), (False, affordable)):
        for evals in range(_SAMPLED_EVALS, _FEWEST_EVALS - 1, -1):
            size = min(n_validation, math.floor(left / n_evals(evals)))
            if size >= smallest:
                sample = size if size < n_validation else None
                return EvaluationPlan(every(evals), sample, final or sample is None)
    sample = smallest if smallest < n_validation else None
    return EvaluationPlan(every(_FEWEST_EVALS), sample, sample is None)


def periodic_evaluations(total_steps: int, every_steps: int) -> int:
    """Evaluations at every `every_steps` steps and at the last step."""
    return math.ceil(total_steps / every_steps)
