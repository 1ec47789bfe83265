"""How a caller watches and steers a training run (DESIGN §7).

The worker turns these into database rows and heartbeats; the CLI into a progress bar. A
hook must be quick: it runs on the training thread between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class Event:
    level: Literal["info", "warning", "error"]
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def _ignore(*_: Any) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class Hooks:
    on_event: Callable[[Event], None] = _ignore
    # (step, metrics): per optimizer step {train_loss, learning_rate, grad_norm,
    # tokens_per_second, epoch, total_steps, eta_seconds, ...}; per evaluation {eval_*}.
    on_metrics: Callable[[int, dict[str, float]], None] = _ignore
    # (checkpoint directory, step, the latest eval metrics); called once it is complete.
    on_checkpoint: Callable[[Path, int, dict[str, float]], None] = _ignore
    # Polled before every step; True stops the run at once (cancel, lost lease, Ctrl-C).
    should_stop: Callable[[], bool] = _never
