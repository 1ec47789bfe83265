"""What a run writes: its checkpoints, result.json and the output directory.

training.py calls these at its checkpoints and at the end; the files' formats are
checkpoint.py's and outputs.py's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from peft_engine import checkpoint as ckpt
from peft_engine import outputs
from peft_engine.fsdp import GatheredOptimizer
from peft_engine.hooks import Event
from peft_engine.run_state import Run
from peft_engine.schedule import scheduler_state


def save_checkpoint(run: Run, state: ckpt.TrainerState) -> None:
    """A checkpoint of everything a resume needs, timed into the state's timings; rank 0's
    alone (every rank holds the same weights and optimizer state)."""
    started = time.monotonic()
    weights, optimizer = run.weights, run.optimizer
    if run.sharding is not None:  # every rank gathers; rank 0 writes (fsdp.py)
        weights = run.sharding.saving(run.weights.state(run.model))
        optimizer = GatheredOptimizer(run.checkpoint_optimizer.state_dict())
    if not run.world.is_main:
        return
    state.scheduler = scheduler_state(run.scheduler)
    state.grad_scaler = run.precision.scaler_state()
    state.precision = run.precision.mode  # "auto" resumes in it (precision.resumed_precision)
    state.timings.checkpoints += 1
    state.timings.wall_seconds = run.wall_seconds()
    path = ckpt.save_checkpoint(
        run.workdir / "checkpoints" / f"checkpoint-{state.step}",
        model=run.model,
        weights=weights,
        optimizer=optimizer,
        state=state,
        best_weights=run.best_weights,
        method_state=run.method_trainer.state(),
        model_info=run.model_info,
    )
    state.timings.checkpoint_seconds += time.monotonic() - started
    run.hooks.on_checkpoint(path, state.step, dict(state.last_eval))


def write_output(
    run: Run, result: dict[str, Any], diagnostics: list[dict[str, Any]]
) -> Path | None:
    """The output directory: the trained weights, tokenizer, result.json, metrics and
    per-example diagnostics; rank 0's alone (None on the other ranks)."""
    weights = run.weights
    if run.sharding is not None:  # every rank gathers; rank 0 writes (fsdp.py)
        weights = run.sharding.saving(run.weights.state(run.model))
    if not run.world.is_main:
        return None
    output_dir = outputs.write_output(
        run.workdir,
        model=run.model,
        weights=weights,
        tokenizer=run.job.tokenizer,
        job=run.job,
        result=result,
        metrics_log=run.metrics_log,
        model_info=run.model_info,
        diagnostics=diagnostics,
    )
    run.hooks.on_event(Event("info", f"wrote {output_dir}", {"output_dir": str(output_dir)}))
    return output_dir


def build_result(
    run: Run,
    state: ckpt.TrainerState,
    early_stopped: bool,
    kept: outputs.KeptEvaluation | None = None,
) -> dict[str, Any]:
    """result.json's contents, with the wall seconds of every attempt so far."""
    state.timings.wall_seconds = run.wall_seconds()
    return outputs.build_result(
        run.job,
        state,
        wall_seconds=time.monotonic() - run.started,
        early_stopped=early_stopped,
        kept=kept,
    )
