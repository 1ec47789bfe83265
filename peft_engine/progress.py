"""Progress for people: a live bar on a terminal, plain log lines otherwise (CI, files)."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import TextIO

from peft_engine.hooks import Event, Hooks


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class ConsoleProgress:
    """Hooks that draw progress on `stream`; `stop_requested` is set by the CLI on Ctrl-C."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.stop_requested = False
        self._bar_shown = False
        self._tokens_per_second: float | None = None
        self._rate_unit = "tok/s"  # "img/s" once the prepared event says the job counts images
        self._last_line = 0.0

    def hooks(self) -> Hooks:
        return Hooks(
            on_event=self.on_event,
            on_metrics=self.on_metrics,
            on_checkpoint=self.on_checkpoint,
            should_stop=lambda: self.stop_requested,
        )

    def on_event(self, event: Event) -> None:
        if event.data.get("unit") == "images":  # an image is one "token" in the rate
            self._rate_unit = "img/s"
        prefix = "" if event.level == "info" else f"{event.level}: "
        self._print_line(prefix + event.message)

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, float]) -> None:
        self._print_line(f"checkpoint at step {step}: {path}")

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train_loss" not in metrics:
            return  # evaluations arrive as events too
        rate = metrics["tokens_per_second"]
        # A smoothed rate: single steps vary with the lengths of their examples.
        self._tokens_per_second = (
            rate if self._tokens_per_second is None else 0.8 * self._tokens_per_second + 0.2 * rate
        )
        total = int(metrics["total_steps"])
        text = (
            f"step {step}/{total} loss {metrics['train_loss']:.4f} "
            f"lr {metrics['learning_rate']:.2e} {self._tokens_per_second:,.0f} {self._rate_unit} "
            f"ETA {format_duration(metrics['eta_seconds'])}"
        )
        if self.live:
            self._draw_bar(step, total, text)
        elif step == total or time.monotonic() - self._last_line >= 10 or step == 1:
            self._print_line(text)

    def _draw_bar(self, step: int, total: int, text: str) -> None:
        width = 24
        filled = round(width * step / total)
        bar = "█" * filled + "░" * (width - filled)
        self.stream.write(f"\r\033[K{bar} {100 * step / total:3.0f}% {text}")
        self.stream.flush()
        self._bar_shown = True

    def _print_line(self, text: str) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()
        self._last_line = time.monotonic()


def quiet_library_output() -> None:
    """Our own progress is what a user follows; transformers' loading bars and deprecation
    notices about its internals would only bury it (in a terminal or a worker's log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
