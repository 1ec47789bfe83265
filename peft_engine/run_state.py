"""What a training run holds between its phases (training.py and loop_eval.py share it).

`Run` is built once the model is: the prepared job, the model and its method, the optimizer
and schedule, where metrics and checkpoints go, and the evaluations' examples and tokens.
`StepSums` is what one optimizer step went through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peft_engine import outputs
from peft_engine.distributed import SINGLE, World
from peft_engine.hooks import Hooks
from peft_engine.methods.common import MethodTrainer
from peft_engine.methods.weights import WeightsFormat
from peft_engine.precision import Precision
from peft_engine.prepare import PreparedJob
from peft_engine.schedule import PlateauScale
from peft_engine.tasks.base import Task


@dataclass
class Run:
    """What the phases after the model's construction work with."""

    job: PreparedJob
    task: Task
    device: torch.device
    tokens_per_forward: int
    model: Any
    weights: WeightsFormat  # how this method's trained weights are saved and restored
    method_trainer: MethodTrainer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    plateau: PlateauScale
    metrics_log: outputs.MetricsLog
    hooks: Hooks
    workdir: Path
    model_info: dict[str, Any]  # tuneq_model.json, in every checkpoint and the output
    started: float  # time.monotonic() when this process began the job
    precision: Precision  # the compute mode every forward pass runs in, and fp16's GradScaler
    best_weights: dict[str, torch.Tensor] | None = None  # of the best evaluation so far
    wall_before: float = 0.0  # wall seconds of earlier attempts, to the resumed checkpoint
    eval_examples: list[Any] = field(default_factory=list)  # of the periodic evaluations
    # tokens of one periodic evaluation, and of the kept weights' whole-set one (0: none)
    periodic_eval_tokens: int = 0
    final_eval_tokens: int = 0
    world: World = SINGLE  # this process's rank among the job's (distributed.py)
    # a model sharded over the ranks (fsdp.py): its weights and optimizer read whole; None
    # when every rank holds the whole model (one process, or data parallel)
    sharding: Any = None
    checkpoint_optimizer: Any = None  # what checkpoints save and load; None: `optimizer`

    @property
    def sampled(self) -> bool:
        """Whether the periodic evaluations use a sample."""
        return self.job.spec.hyperparameters.eval_sample_size is not None

    @property
    def final_whole_set(self) -> bool:
        """Whether the kept weights get a whole-set evaluation at the end (a sampled plan's,
        when the budget affords it)."""
        return self.sampled and self.job.spec.hyperparameters.final_eval_whole_set

    def wall_seconds(self) -> float:
        return self.wall_before + time.monotonic() - self.started


@dataclass(frozen=True)
class StepSums:
    """What one optimizer step went through, for its metrics and the run's counters."""

    loss_sum: float
    loss_tokens: int
    tokens: int
    grad_norm: torch.Tensor
    learning_rate: float
