"""A run's hooks through a file: how ranks under torchrun report to the worker that started them.

A job across several processes (`resources.gpus`) runs `python -m peft_engine train` under
torchrun, a child of the worker. Rank 0 writes every hook call as one JSON line to the
report file, flushed at once; the worker reads the new lines as they come and calls its own
hooks with them (events, metrics, checkpoints, in order), so the database and the store see
the same calls as from a run in the worker's own process. The worker asks the ranks to stop
(cancel, a lost lease, shutdown) by creating the stop file, which every rank polls before
each step; they agree on the step through `World.any_`.

The lines: {"type": "event", "level", "message", "data"}, {"type": "metrics", "step",
"metrics"}, {"type": "checkpoint", "path", "step", "metrics"}, then at the end one of
{"type": "result", "status", "output_dir", "result"}, {"type": "error", "code", "message",
"param"} (the user's fault: the job fails with that code) or {"type": "crash", "error"}
(anything else, with its text: the worker's retry rules judge it).
"""

from __future__ import annotations

import ctypes
import json
import signal
import sys
from pathlib import Path
from typing import Any

from peft_engine.hooks import Event, Hooks


class ReportWriter:
    """Rank 0's side: hooks that append to the report file, and the run's last line."""

    def __init__(self, path: Path, stop_file: Path | None) -> None:
        self.path = path
        self.stop_file = stop_file
        self._file = path.open("a", encoding="utf-8")

    def hooks(self) -> Hooks:
        return Hooks(
            on_event=lambda e: self.write(
                {"type": "event", "level": e.level, "message": e.message, "data": e.data}
            ),
            on_metrics=lambda step, m: self.write({"type": "metrics", "step": step, "metrics": m}),
            on_checkpoint=lambda path, step, m: self.write(
                {"type": "checkpoint", "path": str(path), "step": step, "metrics": m}
            ),
            should_stop=self.stop_requested,
        )

    def stop_requested(self) -> bool:
        return self.stop_file is not None and self.stop_file.exists()

    def write(self, line: dict[str, Any]) -> None:
        self._file.write(json.dumps(line, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def quiet_hooks(stop_file: Path | None) -> Hooks:
    """The other ranks' hooks: they report nothing, but see the stop file as rank 0 does."""
    return Hooks(should_stop=lambda: stop_file is not None and stop_file.exists())


class ReportReader:
    """The worker's side: the complete lines appended since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            file.seek(self._offset)
            chunk = file.read()
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")  # a line still being written waits
        return [json.loads(line) for line in lines if line.strip()]


def dispatch(line: dict[str, Any], hooks: Hooks) -> None:
    """Call `hooks` with a progress line (event, metrics, checkpoint); the end lines are the
    caller's to read."""
    kind = line["type"]
    if kind == "event":
        hooks.on_event(Event(line["level"], line["message"], line.get("data") or {}))
    elif kind == "metrics":
        hooks.on_metrics(int(line["step"]), line["metrics"])
    elif kind == "checkpoint":
        hooks.on_checkpoint(Path(line["path"]), int(line["step"]), line["metrics"])


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Linux: have the kernel send `sig` to this process when its parent dies, so that no
    rank trains on for a worker (or a torchrun) that is gone. Elsewhere: nothing."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)
