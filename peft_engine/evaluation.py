"""Evaluations during training: the task's metrics on the validation data, the best
evaluation so far, early stopping's patience, and how an evaluation is reported.

The periodic evaluations (the base model's, every `eval_every_steps`, the last step's) use
the same fixed sample of the validation set when the plan has one (`eval_sample_size`), so
that they compare with each other: the best weights, early stopping and reduce_on_plateau
go by them. The weights kept are then evaluated once more on the whole set.

Early stopping counts evaluations that fail to beat a reference loss by more than
`min_delta`; the best weights are those of the lowest eval loss, however small the gain.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from peft_engine.hooks import Event, Hooks

if TYPE_CHECKING:
    from peft_engine.checkpoint import TrainerState
    from peft_engine.methods.weights import WeightsFormat
    from peft_engine.outputs import MetricsLog
    from peft_engine.prepare import PreparedJob
    from peft_engine.tasks.base import ExampleResult, Task


def sample_indices(n_examples: int, size: int | None, seed: int) -> list[int]:
    """Which validation examples a periodic evaluation uses, in file order: `size` of them
    chosen by `seed` (a larger sample holds every smaller one), or all when `size` is None."""
    if size is None or size >= n_examples:
        return list(range(n_examples))
    order = list(range(n_examples))
    random.Random(f"eval-sample:{seed}").shuffle(order)  # its own generator: no global RNG
    return sorted(order[:size])


def periodic_examples(job: PreparedJob) -> list[Any]:
    """The validation examples of the periodic evaluations (the plan's sample, or all)."""
    assert job.validation is not None
    hp = job.spec.hyperparameters
    examples = job.validation.examples
    return [examples[i] for i in sample_indices(len(examples), hp.eval_sample_size, hp.seed)]


def evaluate(
    model: Any,
    job: PreparedJob,
    task: Task,
    device: torch.device,
    examples: Sequence[Any] | None = None,
) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
    """The task's metrics on `examples` (default: the whole validation set), its report
    (per class, per type), and each example's result (peft_engine.diagnostics)."""
    assert job.validation is not None
    hp = job.spec.hyperparameters
    examples = job.validation.examples if examples is None else examples
    batches = (
        task.collate(examples[i : i + hp.batch_size], job)
        for i in range(0, len(examples), hp.batch_size)
    )
    return task.evaluate(model, batches, device, job)


def record_eval(state: TrainerState, step: int, rule: Any) -> tuple[bool, bool]:
    """Update the best-so-far and the patience count; say (is it the best, stop now)."""
    es, loss = state.early_stopping, state.last_eval["eval_loss"]
    is_best = es.best_loss is None or loss < es.best_loss
    if is_best:
        es.best_loss, es.best_step, state.best_metrics = loss, step, dict(state.last_eval)
    # Patience counts evaluations that fail to beat the reference by at least min_delta.
    min_delta = rule.min_delta if rule else 0.0
    if es.reference_loss is None or loss < es.reference_loss - min_delta:
        es.reference_loss, es.evals_without_improvement = loss, 0
    else:
        es.evals_without_improvement += 1
    return is_best, rule is not None and es.evals_without_improvement >= rule.patience


def early_stop_message(state: TrainerState, rule: Any) -> str:
    return (
        f"early stopping at step {state.step}: no eval-loss improvement of more than "
        f"{rule.min_delta} in {rule.patience} evaluations; "
        f"best step {state.early_stopping.best_step}"
    )


def snapshot(model: Any, weights: WeightsFormat) -> dict[str, torch.Tensor]:
    """A copy of the trained weights on the CPU, kept while training goes on."""
    return {k: v.detach().cpu().clone() for k, v in weights.state(model).items()}


def log_eval(
    step: int,
    metrics: dict[str, float],
    task: Task,
    log: MetricsLog,
    hooks: Hooks,
    what: str = "",
) -> None:
    log.write(step, metrics)
    hooks.on_metrics(step, metrics)
    label = what or f"step {step}"
    hooks.on_event(
        Event("info", f"eval ({label}): {task.describe_eval(metrics)}", {"step": step, **metrics})
    )
