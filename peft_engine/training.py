"""The training loop: a job spec and local data in, a trained adapter out.

    prepare (spec, model files, data) → build model + method → optimizer, schedule →
    resume or evaluate the base model → steps (forward, loss, backward, clip, step,
    schedule, log, evaluate, checkpoint) → final evaluation → keep the best → write output

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

import hashlib
import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from peft_engine import checkpoint as ckpt
from peft_engine import outputs
from peft_engine.data.batching import epoch_order, micro_batches
from peft_engine.errors import SpecError
from peft_engine.hooks import Event, Hooks
from peft_engine.methods import method_for
from peft_engine.methods.common import MethodTrainer
from peft_engine.methods.weights import WeightsFormat
from peft_engine.models import ModelRegistry, load_registry
from peft_engine.models.attention import use_packed_attention
from peft_engine.prepare import DataPaths, PreparedJob, prepare_job
from peft_engine.spec import JobSpec, parse_spec
from peft_engine.tasks import Task, task_for


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
) -> TrainResult:
    """Run a job to its end (or a stop on request); see the module's docstring.

    `tokens_per_forward` caps the tokens of one forward pass of a causal-LM step (default:
    `default_tokens_per_forward(device)`); it changes memory and speed, never the result.
    """
    started = time.monotonic()
    hooks = hooks or Hooks()
    workdir = Path(workdir)
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
    _announce(job, hooks)

    # 2. Model: the base weights and the task's head, then the method (seeded init).
    task = task_for(job.spec.task)
    device, dtype = select_device()
    forward_budget = tokens_per_forward or default_tokens_per_forward(device)
    _seed_everything(hp.seed)
    base = task.load_model(job, dtype=dtype, device=device)
    if job.spec.task == "causal_lm" and hp.packing:
        use_packed_attention(base)  # packed rows: attention within each example only
    method = method_for(job.spec.method.type)
    model = method.build(base, job.spec.method, job.spec.task)
    weights = method.weights  # how this method's trained weights are saved and restored
    method_trainer = (
        method.trainer(model, job.spec.method, hp, job.spec.task)
        if method.trainer
        else MethodTrainer()
    )
    model.train()

    # 3. Optimizer and learning-rate schedule (reduce_on_plateau scales it after evaluations).
    groups = method_trainer.param_groups(hp.weight_decay) or _param_groups(model, hp.weight_decay)
    for group in groups:  # a group's lr_scale (discriminative learning rates) scales the peak
        group["lr"] = hp.learning_rate * group.get("lr_scale", 1.0)
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.999))
    plateau = PlateauScale()
    schedule = partial(
        lr_multiplier, kind=hp.lr_scheduler, warmup=hp.warmup_steps, total=hp.total_steps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule(step) * plateau.scale
    )

    # 4. Resume from a checkpoint, or measure the base model so the gain can be shown.
    metrics_log = outputs.MetricsLog(workdir / "metrics.jsonl")
    best_weights: dict[str, torch.Tensor] | None = None
    if resume_from is not None:
        loaded = ckpt.load_checkpoint(resume_from, optimizer=optimizer, weights=weights)
        _check_same_job(loaded.state, job)
        method_trainer.before_step(loaded.state.step + 1)  # e.g. the layers unfrozen by then
        weights.restore(model, loaded.trained_weights)
        method_trainer.load_state(loaded.method_state)
        plateau.scale = loaded.state.plateau["scale"]
        scheduler.load_state_dict(
            {**loaded.state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)}
        )
        state, best_weights = loaded.state, loaded.best_weights
        metrics_log.truncate_after(state.step)
        hooks.on_event(Event("info", f"resumed from {resume_from} at step {state.step}"))
    else:
        state = ckpt.TrainerState(
            step=0, epoch=0, total_steps=hp.total_steps, spec_fingerprint=_fingerprint(job)
        )
        metrics_log.reset()
        if job.validation is not None:
            state.initial_metrics, state.last_report = _evaluate(model, job, task, device)
            state.last_eval = dict(state.initial_metrics)
            _log_eval(0, state.initial_metrics, task, metrics_log, hooks, "base model")

    def save_checkpoint() -> None:
        state.scheduler = _scheduler_state(scheduler)
        path = ckpt.save_checkpoint(
            workdir / "checkpoints" / f"checkpoint-{state.step}",
            model=model,
            weights=weights,
            optimizer=optimizer,
            state=state,
            best_weights=best_weights,
            method_state=method_trainer.state(),
            model_info=_model_info(job, task),
        )
        hooks.on_checkpoint(path, state.step, dict(state.last_eval))

    # 5. Optimizer steps.
    stopped = early_stopped = False
    loop_started, steps_this_run = time.monotonic(), 0
    while state.step < hp.total_steps:
        if hooks.should_stop():
            stopped = True
            break
        step_started = time.monotonic()
        step = state.step + 1
        method_trainer.before_step(step)
        micro = step_micro_batches(job, step, task, tokens_per_forward=forward_budget)
        step_loss_tokens = sum(b.n_loss_tokens for b in micro)

        # forward + backward per micro-batch; loss normalised by the step's loss tokens
        loss_sum = 0.0
        for batch in micro:
            result = task.loss(model, batch.to(device), job)
            (result.loss / step_loss_tokens).backward()
            loss_sum += float(result.loss.detach())
        if (extra := method_trainer.extra_loss()) is not None:
            extra.backward()  # a method's regulariser (AdaLoRA's orthogonality), once a step

        # clip, step, schedule
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, hp.max_grad_norm or math.inf)
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        method_trainer.after_optimizer_step(step)
        optimizer.zero_grad(set_to_none=True)

        # log
        step_tokens = sum(b.n_tokens for b in micro)
        step_seconds = time.monotonic() - step_started
        steps_this_run += 1
        state.step, state.epoch = step, step // hp.steps_per_epoch
        state.trained_tokens += step_tokens
        state.trained_loss_tokens += step_loss_tokens
        state.train_seconds += step_seconds
        seconds_per_step = (time.monotonic() - loop_started) / steps_this_run
        train_metrics = {
            "train_loss": loss_sum / step_loss_tokens,
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_second": step_tokens / step_seconds,
            "epoch": step / hp.steps_per_epoch,
            "total_steps": hp.total_steps,
            "eta_seconds": seconds_per_step * (hp.total_steps - step),
            "trained_tokens": state.trained_tokens,
        }
        metrics_log.write(step, train_metrics)
        hooks.on_metrics(step, train_metrics)

        # evaluate; keep the best weights; stop early when eval loss stops improving
        if job.validation is not None and (
            step % hp.eval_every_steps == 0 or step == hp.total_steps
        ):
            state.last_eval, state.last_report = _evaluate(model, job, task, device)
            _log_eval(step, state.last_eval, task, metrics_log, hooks)
            is_best, early_stopped = _record_eval(state, step, hp.early_stopping)
            if is_best:
                best_weights = _snapshot(model, weights)
                state.best_report = state.last_report
            if hp.lr_scheduler == "reduce_on_plateau" and plateau.update(state, hp):
                hooks.on_event(
                    Event(
                        "info",
                        f"eval loss has not improved for {hp.reduce_on_plateau.patience} "
                        f"evaluations: learning rate x{plateau.scale:g} of the peak",
                        {"step": step, "lr_scale": plateau.scale},
                    )
                )

        # checkpoint (not after the last step: the output is written instead)
        last = step == hp.total_steps or early_stopped
        if step % hp.checkpoint_every_steps == 0 and not last:
            save_checkpoint()
        if early_stopped:
            hooks.on_event(Event("info", _early_stop_message(state, hp.early_stopping)))
            break

    if stopped:
        # A stop on request (pause, Ctrl-C, cancel) keeps the steps done since the last
        # checkpoint, so the run can resume from here.
        if state.step > 0 and state.step % hp.checkpoint_every_steps != 0:
            save_checkpoint()
        hooks.on_event(Event("warning", f"stopped at step {state.step} on request"))
        return TrainResult("stopped", None, _result(job, state, started, early_stopped), model)

    # 6. Keep the best evaluation's weights, and write the output.
    best_step = state.early_stopping.best_step
    if best_weights is not None and best_step != state.step:
        weights.restore(model, best_weights)
        hooks.on_event(Event("info", f"kept the weights of step {best_step}, the best eval loss"))
    result = _result(job, state, started, early_stopped)
    output_dir = outputs.write_output(
        workdir,
        model=model,
        weights=weights,
        tokenizer=job.tokenizer,
        job=job,
        result=result,
        metrics_log=metrics_log,
        model_info=_model_info(job, task),
    )
    hooks.on_event(Event("info", f"wrote {output_dir}", {"output_dir": str(output_dir)}))
    return TrainResult("succeeded", output_dir, result, model)


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

    def update(self, state: ckpt.TrainerState, hp: Any) -> bool:
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


def step_micro_batches(
    job: PreparedJob,
    step: int,
    task: Task | None = None,
    *,
    tokens_per_forward: int | None = None,
) -> list[Any]:
    """The micro-batches of optimizer step `step` (1-based), fixed by seed and step alone.

    With `tokens_per_forward`, a causal-LM micro-batch is cut into consecutive runs of
    whole examples of at most that many tokens (an example longer than it goes alone).
    Other tasks are not cut: a batch-norm body sees the batch it was configured with.
    """
    hp = job.spec.hyperparameters
    epoch, index_in_epoch = divmod(step - 1, hp.steps_per_epoch)
    examples = job.train.examples
    order = epoch_order(len(examples), seed=hp.seed, epoch=epoch)
    groups = micro_batches(examples, order, hp.batch_size)
    first = index_in_epoch * hp.gradient_accumulation_steps
    task = task or task_for(job.spec.task)
    groups = groups[first : first + hp.gradient_accumulation_steps]
    if tokens_per_forward and task.name == "causal_lm":
        groups = [piece for group in groups for piece in split_by_tokens(group, tokens_per_forward)]
    return [task.collate(group, job) for group in groups]


def split_by_tokens(examples: list[Any], budget: int) -> list[list[Any]]:
    """Consecutive runs of examples whose lengths add up to at most `budget` tokens."""
    pieces: list[list[Any]] = []
    current: list[Any] = []
    tokens = 0
    for example in examples:
        length = len(example.input_ids)
        if current and tokens + length > budget:
            pieces.append(current)
            current, tokens = [], 0
        current.append(example)
        tokens += length
    if current:
        pieces.append(current)
    return pieces


def default_tokens_per_forward(device: torch.device) -> int:
    """512 tokens on a CPU, where that was the fastest size measured (bench/README.md) and
    keeps activations near 1 GB for a 135M model; 16,384 on a GPU, where larger matmuls pay."""
    return 16_384 if device.type == "cuda" else 512


def select_device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _evaluate(
    model: Any, job: PreparedJob, task: Task, device: torch.device
) -> tuple[dict[str, float], dict[str, Any]]:
    """The task's metrics on the validation data, and its report (per class, per type)."""
    assert job.validation is not None
    hp = job.spec.hyperparameters
    examples = job.validation.examples
    batches = (
        task.collate(examples[i : i + hp.batch_size], job)
        for i in range(0, len(examples), hp.batch_size)
    )
    return task.evaluate(model, batches, device, job)


def _model_info(job: PreparedJob, task: Task) -> dict[str, Any]:
    """tuneq_model.json: what rebuilds the trained model (task head, labels, method)."""
    return {
        **task.model_info(job),
        "base_model": job.entry.name,
        "method": job.spec.method.model_dump(mode="json"),
    }


def _record_eval(state: ckpt.TrainerState, step: int, rule: Any) -> tuple[bool, bool]:
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


def _early_stop_message(state: ckpt.TrainerState, rule: Any) -> str:
    return (
        f"early stopping at step {state.step}: no eval-loss improvement of more than "
        f"{rule.min_delta} in {rule.patience} evaluations; "
        f"best step {state.early_stopping.best_step}"
    )


def _snapshot(model: Any, weights: WeightsFormat) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in weights.state(model).items()}


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and norm scales, as usual.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    # The schedule itself is a function of the spec; only its counters go in the checkpoint.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fingerprint(job: PreparedJob) -> str:
    data = job.spec.model_dump_json(exclude={"training_file", "validation_file", "metadata"})
    order = ",".join(str(e.line) for e in job.train.examples)
    return hashlib.sha256(f"{data}|{order}".encode()).hexdigest()[:16]


def _check_same_job(state: ckpt.TrainerState, job: PreparedJob) -> None:
    if state.spec_fingerprint != _fingerprint(job):
        raise SpecError(
            "the checkpoint was made by a job with other settings or data; resuming it with "
            "this spec would not continue the same run",
            param="resume",
        )


def _announce(job: PreparedJob, hooks: Hooks) -> None:
    hp = job.spec.hyperparameters
    train = job.train
    unit = task_for(job.spec.task).unit
    with_loss = "with loss" if unit == "tokens" else f"{unit} with labels"
    labels = f"; {len(job.labels)} labels" if job.labels else ""
    hooks.on_event(
        Event(
            "info",
            f"{len(train.examples)} training examples ({train.n_tokens} tokens, "
            f"{train.n_loss_tokens} {with_loss}{labels}), "
            f"{len(job.validation.examples) if job.validation else 0} validation examples; "
            f"{hp.total_steps} steps of batch {hp.batch_size}x{hp.gradient_accumulation_steps}, "
            f"{hp.n_epochs} epochs, lr {hp.learning_rate:g}",
            {"resolved_hyperparameters": hp.model_dump()},
        )
    )
    if train.truncated:
        hooks.on_event(
            Event(
                "warning",
                f"{train.truncated} training examples are longer than max_seq_length="
                f"{hp.max_seq_length} and were truncated",
                {"truncated_examples": train.truncated},
            )
        )
    if train.dropped:
        hooks.on_event(
            Event(
                "warning",
                f"{train.dropped} training examples had no token to learn from within "
                f"max_seq_length={hp.max_seq_length} and were left out",
                {"dropped_examples": train.dropped},
            )
        )


def _log_eval(
    step: int,
    metrics: dict[str, float],
    task: Task,
    log: outputs.MetricsLog,
    hooks: Hooks,
    what: str = "",
) -> None:
    log.write(step, metrics)
    hooks.on_metrics(step, metrics)
    label = what or f"step {step}"
    hooks.on_event(
        Event("info", f"eval ({label}): {task.describe_eval(metrics)}", {"step": step, **metrics})
    )


def _result(
    job: PreparedJob, state: ckpt.TrainerState, started: float, early_stopped: bool
) -> dict[str, Any]:
    return outputs.build_result(
        job,
        state,
        wall_seconds=time.monotonic() - started,
        early_stopped=early_stopped,
    )
