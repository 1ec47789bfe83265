"""The training loop: a job spec and local data in, a trained adapter out.

    prepare (spec, model files, data) → build model + method → optimizer, schedule →
    resume or evaluate the base model → steps (forward, loss, backward, clip, step,
    schedule, log, evaluate, checkpoint) → keep the best → evaluate it on the whole
    validation set (when the periodic evaluations use a sample) → write output

Each phase's seconds go into the state's `timings` (result.json's "timings"), and each
step's ETA prices what is left with them (peft_engine/eta.py). What a run holds between
phases is run_state.py's `Run`; the evaluations in the loop are loop_eval.py's, and the
checkpoints, result.json and output that a run writes are run_output.py's.

Gradient accumulation divides every micro-batch's summed loss by the number of loss tokens
in the whole optimizer step, so a step's gradient is the mean over its tokens however the
examples fall into micro-batches (dividing by the number of micro-batches instead would
weight a short example's tokens more than a long one's). The same division makes it exact
to split a micro-batch further: causal-LM micro-batches go through the model in pieces of at
most `tokens_per_forward` tokens (whole examples), so activation memory follows that budget
rather than the batch size, and on a CPU the smaller matmuls also run faster (they stay in
cache). The optimizer step, its gradient and the data order do not change.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from peft_engine import checkpoint as ckpt
from peft_engine import outputs, run_output
from peft_engine.activation_checkpointing import enable_gradient_checkpointing, wants_checkpointing
from peft_engine.data.steps import step_micro_batches
from peft_engine.diagnostics import TrainLossTracker, build_diagnostics
from peft_engine.distributed import SINGLE, World
from peft_engine.errors import TrainingDivergedError
from peft_engine.evaluation import early_stop_message, log_eval, periodic_examples
from peft_engine.fsdp import (
    ShardedOptimizer,
    ShardedWeights,
    grad_norm_value,
    padded_micro_batches,
    shard_model,
    wants_sharding,
)
from peft_engine.hooks import Event, Hooks
from peft_engine.loop_eval import evaluate_kept, evaluate_step, seconds_left, timed_evaluate
from peft_engine.methods import method_for
from peft_engine.methods.common import MethodTrainer
from peft_engine.methods.weights import WeightsFormat
from peft_engine.models import ModelRegistry, load_registry
from peft_engine.models.attention import use_packed_attention
from peft_engine.optim import build_optimizer
from peft_engine.precision import COMPUTE_DTYPES, auto_mode, place_weights, resumed_precision
from peft_engine.prepare import DataPaths, PreparedJob, prepare_job, prepared_events
from peft_engine.run_state import Run, StepSums
from peft_engine.schedule import (
    PlateauScale,
    load_scheduler_state,
    lr_scheduler,
)
from peft_engine.spec import JobSpec, parse_spec
from peft_engine.tasks import task_of
from peft_engine.tasks.base import Task


@dataclass
class TrainResult:
    status: Literal["succeeded", "stopped"]
    output_dir: Path | None  # None when stopped before the end
    result: dict[str, Any]  # what result.json holds
    model: Any = field(default=None, repr=False)  # the trained model, in memory


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "tuneq"


def train(
    spec: JobSpec | dict[str, Any],
    workdir: Path | str,
    hooks: Hooks | None = None,
    *,
    data: DataPaths | None = None,
    resume_from: Path | None = None,
    registry: ModelRegistry | None = None,
    cache_dir: Path | None = None,
    tokens_per_forward: int | None = None,
    world: World = SINGLE,
) -> TrainResult:
    """Run a job to its end (or a stop on request); see the module's docstring.

    `tokens_per_forward` caps the tokens of one forward pass of a causal-LM step (default:
    `default_tokens_per_forward(device)`); it changes memory and speed, never the result.
    `world`: this process's rank among a job's ranks (distributed.py); rank 0 alone reports,
    checkpoints and writes the output, the others return without an output directory.
    """
    started = time.monotonic()
    hooks = hooks or Hooks()
    workdir = Path(workdir)
    if not world.is_main:  # the metrics log of a rank that reports nothing stays apart
        workdir = workdir / "ranks" / f"rank-{world.rank}"
    spec = spec if isinstance(spec, JobSpec) else parse_spec(spec)

    # 1. Spec, model files and data: every user error surfaces here, before weights load.
    hooks.on_event(Event("info", f"preparing {spec.model} and the data"))
    job = prepare_job(
        spec,
        data or DataPaths.from_spec(spec),
        registry=registry or load_registry(),
        cache_dir=cache_dir or default_cache_dir(),
    )
    hp = job.spec.hyperparameters
    for event in prepared_events(job):
        hooks.on_event(event)

    # 2-3. Model (the base weights, the task's head, the method), optimizer and schedule.
    run = _new_run(job, hooks, workdir, started=started, tokens_per_forward=tokens_per_forward,
                   world=world, resume_from=resume_from)  # fmt: skip

    # 4. Resume from a checkpoint, or measure the base model so the gain can be shown.
    state = _resume(run, resume_from) if resume_from is not None else _start(run)

    # 5. Optimizer steps, to the last one, an early stop, the time limit or a stop on request.
    ended = _train_steps(run, state)
    stopped, early_stopped = ended == "stopped", ended == "early"
    if stopped:
        # A stop on request (pause, Ctrl-C, cancel) keeps the steps done since the last
        # checkpoint, so the run can resume from here.
        if state.step > 0 and state.step % hp.checkpoint_every_steps != 0:
            run_output.save_checkpoint(run, state)
        hooks.on_event(Event("warning", f"stopped at step {state.step} on request"))
        return TrainResult(
            "stopped", None, run_output.build_result(run, state, early_stopped), run.model
        )

    # 6. Keep the best evaluation's weights, evaluate them on the whole validation set (a
    # sampled plan's periodic numbers chose them), and write the output.
    _keep_best_weights(run, state)
    kept = evaluate_kept(run, state)
    result = run_output.build_result(run, state, early_stopped, kept)
    result["max_runtime_reached"] = ended == "out_of_time"
    diagnostics = build_diagnostics(state.diagnostics, job)  # per-example, of the kept weights
    result["diagnostics"] = diagnostics.summary
    output_dir = run_output.write_output(run, result, diagnostics.rows)
    return TrainResult("succeeded", output_dir, result, run.model)


def _new_run(
    job: PreparedJob,
    hooks: Hooks,
    workdir: Path,
    *,
    started: float,
    tokens_per_forward: int | None,
    world: World,
    resume_from: Path | None,
) -> Run:
    """The model built and everything the steps work with: optimizer, schedule, the metrics
    log, and the periodic evaluations' examples."""
    hp = job.spec.hyperparameters

    # 2. Model: the base weights and the task's head, then the method (seeded init).
    task = task_of(job.spec)
    device, _ = select_device()
    recorded = ckpt.recorded_precision(resume_from) if resume_from is not None else None
    precision, note = resumed_precision(hp.precision, device, recorded)
    hooks.on_event(Event("warning" if note and "cannot" in note else "info",
                         precision.describe() + (f" ({note})" if note else "")))  # fmt: skip
    dtype = precision.load_dtype(job.spec.method.type)
    model, weights, method_trainer = _build_model(job, task, device, dtype)
    sharding = None
    if wants_sharding(job.spec.method.type, world):  # full fine-tuning on several ranks
        shard_model(model, device, world)
        hooks.on_event(Event("info", f"full fine-tuning sharded over {world.size} ranks (FSDP)"))
        sharding = ShardedWeights(weights, world)
        weights = sharding.format()
    if world.active:  # equal weights from the shared seed; then each rank its own dropout
        torch.manual_seed(hp.seed + 7919 * world.rank)

    # 3. Optimizer and learning-rate schedule (reduce_on_plateau scales it after evaluations);
    # what it trains in float32, the frozen rest in the compute dtype
    optimizer = build_optimizer(model, method_trainer, hp)
    place_weights(model, optimizer, precision)
    checkpoint_optimizer = ShardedOptimizer(model, optimizer) if sharding else optimizer
    plateau = PlateauScale()
    run = Run(
        job=job,
        task=task,
        device=device,
        tokens_per_forward=tokens_per_forward or default_tokens_per_forward(device),
        model=model,
        weights=weights,
        method_trainer=method_trainer,
        optimizer=optimizer,
        scheduler=lr_scheduler(optimizer, hp, plateau),
        plateau=plateau,
        metrics_log=outputs.MetricsLog(workdir / "metrics.jsonl"),
        hooks=hooks,
        workdir=workdir,
        model_info=_model_info(job, task) | {"precision": precision.mode},
        started=started,
        precision=precision,
        world=world,
        sharding=sharding,
        checkpoint_optimizer=checkpoint_optimizer,
    )
    if job.validation is not None:
        run.eval_examples = periodic_examples(job)
        run.periodic_eval_tokens = sum(e.n_tokens for e in run.eval_examples)
        run.final_eval_tokens = job.validation.n_tokens if run.final_whole_set else 0
    return run


def _build_model(
    job: PreparedJob, task: Task, device: torch.device, dtype: torch.dtype
) -> tuple[Any, WeightsFormat, MethodTrainer]:
    """The task's model with the method applied, in training mode; the method's weights
    format, and its trainer (what the method does around each step)."""
    hp = job.spec.hyperparameters
    _seed_everything(hp.seed)
    base = task.load_model(job, dtype=dtype, device=device)
    if job.spec.task == "causal_lm" and hp.packing:
        use_packed_attention(base)  # packed rows: attention within each example only
    method = method_for(job.spec.method.type)
    model = method.build(base, job.spec.method, job.spec.task)
    method_trainer = (
        method.trainer(model, job.spec.method, hp, job.spec.task)
        if method.trainer
        else MethodTrainer()
    )
    if wants_checkpointing(job, device):
        enable_gradient_checkpointing(model, job.spec.method.type)
    model.train()
    return model, method.weights, method_trainer


def _start(run: Run) -> ckpt.TrainerState:
    """A new run's state, after evaluating the base model when there is validation data."""
    job = run.job
    state = ckpt.TrainerState(
        step=0,
        epoch=0,
        total_steps=job.spec.hyperparameters.total_steps,
        spec_fingerprint=ckpt.spec_fingerprint(job),
    )
    run.metrics_log.reset()
    state.timings.load_seconds = time.monotonic() - run.started
    if job.validation is not None:
        state.initial_metrics, state.last_report, _ = timed_evaluate(run, state, run.eval_examples)
        state.last_eval = dict(state.initial_metrics)
        log_eval(0, state.initial_metrics, run.task, run.metrics_log, run.hooks, "base model")
    return state


def _resume(run: Run, path: Path) -> ckpt.TrainerState:
    """Put back all that the checkpoint at `path` holds; its state goes on from its step."""
    loaded = ckpt.load_checkpoint(path, optimizer=run.checkpoint_optimizer, weights=run.weights)
    ckpt.check_same_job(loaded.state, run.job)
    run.method_trainer.before_step(loaded.state.step + 1)  # e.g. the layers unfrozen by then
    run.weights.restore(run.model, loaded.trained_weights)
    run.method_trainer.load_state(loaded.method_state)
    run.plateau.scale = loaded.state.plateau["scale"]
    run.precision.load_scaler_state(loaded.state.grad_scaler)
    load_scheduler_state(run.scheduler, loaded.state.scheduler)
    run.best_weights = loaded.best_weights
    run.metrics_log.truncate_after(loaded.state.step)
    run.hooks.on_event(Event("info", f"resumed from {path} at step {loaded.state.step}"))
    timings = loaded.state.timings
    run.wall_before = timings.wall_seconds
    timings.load_seconds += time.monotonic() - run.started  # this attempt's loading too
    return loaded.state


def _train_steps(run: Run, state: ckpt.TrainerState) -> str:
    """Step until the last step or a stop; say which: "done", "early" (early stopping),
    "out_of_time" (max_runtime_seconds) or "stopped" (on request)."""
    hp = run.job.spec.hyperparameters
    limit = run.job.spec.max_runtime_seconds
    while state.step < hp.total_steps:
        if run.world.any_(run.hooks.should_stop()):
            return "stopped"
        if run.world.any_(limit is not None and run.wall_seconds() >= limit):
            message = f"max_runtime_seconds ({limit} s) reached at step {state.step}"
            run.hooks.on_event(Event("warning", message))
            return "out_of_time"
        step_started = time.monotonic()
        step = state.step + 1

        # forward, loss, backward, clip, step, schedule
        sums = _optimizer_step(run, step, state.diagnostics.train)

        # log
        train_metrics = _count_step(state, step, sums, step_started, hp)
        train_metrics["eta_seconds"] = seconds_left(run, state)
        run.metrics_log.write(step, train_metrics)
        run.hooks.on_metrics(step, train_metrics)

        # evaluate; keep the best weights; stop early when eval loss stops improving
        early_stopped = False
        if run.job.validation is not None and (
            step % hp.eval_every_steps == 0 or step == hp.total_steps
        ):
            early_stopped = evaluate_step(run, state, step)

        # checkpoint (not after the last step: the output is written instead)
        last = step == hp.total_steps or early_stopped
        if step % hp.checkpoint_every_steps == 0 and not last:
            run_output.save_checkpoint(run, state)
        if early_stopped:
            run.hooks.on_event(Event("info", early_stop_message(state, hp.early_stopping)))
            return "early"
    return "done"


def _optimizer_step(run: Run, step: int, train_losses: TrainLossTracker) -> StepSums:
    """Optimizer step `step`: forward, loss and backward for each of its micro-batches, then
    clip, step and schedule; each example's loss goes to `train_losses`."""
    run.method_trainer.before_step(step)
    micro = step_micro_batches(
        run.job, step, run.task, tokens_per_forward=run.tokens_per_forward, world=run.world
    )
    # the whole step's loss tokens (over every rank's share) divide each micro-batch's loss
    loss_tokens = int(run.world.sum_([sum(b.n_loss_tokens for b in micro)])[0])

    # forward + backward per micro-batch; loss normalised by the step's loss tokens
    loss_sum = 0.0
    passes = [(b, True) for b in micro]
    if run.sharding:  # as many passes on every rank, the extra ones counting zero (fsdp.py)
        passes = padded_micro_batches(
            micro,
            run.world,
            lambda: step_micro_batches(
                run.job, step, run.task, tokens_per_forward=run.tokens_per_forward
            )[0],
        )
    for batch, counts in passes:
        with run.precision.autocast():
            result = run.task.loss(run.model, batch.to(run.device), run.job)
        # fp16: scaled by its GradScaler
        run.precision.backward(result.loss / loss_tokens if counts else result.loss * 0.0)
        if counts:
            loss_sum += float(result.loss.detach())
            train_losses.record(result.examples)
    if (extra := run.method_trainer.extra_loss()) is not None:
        # a method's regulariser (AdaLoRA's orthogonality), once for the step over the ranks
        run.precision.backward(extra / run.world.size)
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    if not run.sharding:  # each rank's share summed: the whole step's gradient (FSDP sums its own)
        run.world.reduce_gradients(trainable)
    loss_sum, tokens = run.world.sum_([loss_sum, sum(b.n_tokens for b in micro)])
    if not math.isfinite(loss_sum):  # stop before the step applies it to the weights
        raise TrainingDivergedError(
            f"the training loss was {loss_sum} at step {step}: training diverged; a lower "
            "learning rate (or max_grad_norm) usually keeps it finite; the checkpoints saved "
            "before it are sound",
            param="hyperparameters.learning_rate",
        )

    # clip, step, schedule
    max_grad_norm = run.job.spec.hyperparameters.max_grad_norm
    run.precision.unscale(run.optimizer)
    grad_norm = grad_norm_value(
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or math.inf)
    )
    learning_rate = run.scheduler.get_last_lr()[0]
    run.precision.step(run.optimizer)  # fp16: skipped when a gradient overflowed
    run.scheduler.step()
    run.method_trainer.after_optimizer_step(step)
    run.optimizer.zero_grad(set_to_none=True)
    return StepSums(loss_sum, loss_tokens, int(tokens), grad_norm, learning_rate)


def _count_step(
    state: ckpt.TrainerState,
    step: int,
    sums: StepSums,
    step_started: float,
    hp: Any,
) -> dict[str, float]:
    """Move the state's counters past `step`; the step's training metrics (its ETA is
    `seconds_left`'s)."""
    step_seconds = time.monotonic() - step_started
    state.step, state.epoch = step, step // hp.steps_per_epoch
    state.trained_tokens += sums.tokens
    state.trained_loss_tokens += sums.loss_tokens
    state.timings.train_seconds += step_seconds
    state.timings.train_tokens += sums.tokens
    grad_norm = float(sums.grad_norm)  # inf on an fp16 step the GradScaler skipped: left out
    return {
        "train_loss": sums.loss_sum / sums.loss_tokens,
        "learning_rate": sums.learning_rate,
        **({"grad_norm": grad_norm} if math.isfinite(grad_norm) else {}),  # JSON has no inf
        "tokens_per_second": sums.tokens / step_seconds,
        "epoch": step / hp.steps_per_epoch,
        "total_steps": hp.total_steps,
        "trained_tokens": state.trained_tokens,
    }


def _keep_best_weights(run: Run, state: ckpt.TrainerState) -> None:
    best_step = state.early_stopping.best_step
    if run.best_weights is not None and best_step != state.step:
        run.weights.restore(run.model, run.best_weights)
        run.hooks.on_event(
            Event("info", f"kept the weights of step {best_step}, the best eval loss")
        )


def default_tokens_per_forward(device: torch.device) -> int:
    """512 tokens on a CPU, where that was the fastest size measured (bench/README.md) and
    keeps activations near 1 GB for a 135M model; 16,384 on a GPU, where larger matmuls pay."""
    return 16_384 if device.type == "cuda" else 512


def select_device() -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype its frozen weights take in "auto" precision (precision.py).
    Under torchrun "cuda" is the rank's own GPU (distributed.world_from_env sets it)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, COMPUTE_DTYPES[auto_mode(device)]


def _model_info(job: PreparedJob, task: Task) -> dict[str, Any]:
    """tuneq_model.json: what rebuilds the trained model (task head, labels, method); the
    run adds the compute mode it trained and evaluated in (`precision`)."""
    return {
        **task.model_info(job),
        "base_model": job.entry.name,
        "method": job.spec.method.model_dump(mode="json"),
    }


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
