"""The evaluations inside the training loop, and the ETA each step reports.

    base model (training.py's `_start`) → after every `eval_every_steps` steps and the last
    (`evaluate_step`: keep the best weights, lower the learning rate on a plateau, stop
    early) → the kept weights on the whole validation set (`evaluate_kept`)

Every evaluation is timed into the state's `timings` (`timed_evaluate`), and
`seconds_left` prices the work left with those timings (peft_engine/eta.py).
"""

from __future__ import annotations

import time
from typing import Any

from peft_engine import checkpoint as ckpt
from peft_engine import outputs
from peft_engine.eta import Rates, eta_seconds, remaining_work
from peft_engine.evaluation import evaluate, log_eval, record_eval, snapshot
from peft_engine.hooks import Event
from peft_engine.run_state import Run
from peft_engine.tasks.base import ExampleResult


def seconds_left(run: Run, state: ckpt.TrainerState) -> float:
    """Seconds left after `state.step`'s training: steps, evaluations, checkpoints, output."""
    hp = run.job.spec.hyperparameters
    work = remaining_work(
        step=state.step,
        total_steps=hp.total_steps,
        eval_every=hp.eval_every_steps if run.job.validation is not None else None,
        checkpoint_every=hp.checkpoint_every_steps,
        eval_tokens_each=run.periodic_eval_tokens,
        final_eval_tokens=run.final_eval_tokens,
        # every epoch trains on all the examples' tokens (max_steps may cut the last one)
        train_tokens=round(
            run.job.train.n_tokens * hp.total_steps / hp.steps_per_epoch - state.trained_tokens
        ),
    )
    return eta_seconds(work, Rates.measured(state.timings, state.step))


def timed_evaluate(
    run: Run, state: ckpt.TrainerState, examples: list[Any] | None = None
) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
    """`evaluate` on `examples` (default: the whole validation set), counted in the timings."""
    started = time.monotonic()
    with run.precision.autocast():  # as the training steps compute
        metrics, report, results = evaluate(run.model, run.job, run.task, run.device, examples)
    examples = run.job.validation.examples if examples is None else examples
    state.timings.eval_seconds += time.monotonic() - started
    state.timings.eval_tokens += sum(e.n_tokens for e in examples)
    state.timings.evaluations += 1
    return metrics, report, results


def evaluate_step(run: Run, state: ckpt.TrainerState, step: int) -> bool:
    """Evaluate after `step`, keep the weights when they are the best so far, lower the
    learning rate on a plateau; True when early stopping says to stop."""
    hp = run.job.spec.hyperparameters
    state.last_eval, state.last_report, examples = timed_evaluate(run, state, run.eval_examples)
    state.diagnostics.record_eval(step, examples)
    log_eval(step, state.last_eval, run.task, run.metrics_log, run.hooks)
    is_best, early_stopped = record_eval(state, step, hp.early_stopping)
    if is_best:
        run.best_weights = snapshot(run.model, run.weights)
        state.best_report = state.last_report
        state.diagnostics.keep_best()
    if hp.lr_scheduler == "reduce_on_plateau" and run.plateau.update(state, hp):
        run.hooks.on_event(
            Event(
                "info",
                f"eval loss has not improved for {hp.reduce_on_plateau.patience} "
                f"evaluations: learning rate x{run.plateau.scale:g} of the peak",
                {"step": step, "lr_scale": run.plateau.scale},
            )
        )
    return early_stopped


def evaluate_kept(run: Run, state: ckpt.TrainerState) -> outputs.KeptEvaluation | None:
    """The kept weights' metrics and report on the whole validation set; None without one."""
    if run.job.validation is None or state.step == 0:
        return None
    if not run.final_whole_set:  # the whole set already, or a sample the budget keeps to
        return outputs.KeptEvaluation(
            state.best_metrics, state.best_report or state.last_report, "periodic"
        )
    metrics, report, examples = timed_evaluate(run, state)
    # the diagnostics of the kept weights come from this whole-set evaluation, not the sample
    state.diagnostics.record_eval(state.early_stopping.best_step or state.step, examples)
    state.diagnostics.keep_best()
    label = f"kept weights of step {state.early_stopping.best_step}, whole validation set"
    run.hooks.on_event(
        Event(
            "info",
            f"eval ({label}): {run.task.describe_eval(metrics)}",
            {"step": state.step, "kept": metrics},
        )
    )
    return outputs.KeptEvaluation(metrics, report, "final")
