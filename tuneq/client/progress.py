"""A job's events drawn as the demo and `python -m peft_engine` draw a local run: a live
bar (step, loss, ETA) on a terminal, plain lines otherwise, each evaluation on its line."""

from __future__ import annotations

from peft_engine.hooks import Event as EngineEvent
from peft_engine.progress import ConsoleProgress
from tuneq.client.types import Event


def draw_event(progress: ConsoleProgress, event: Event) -> None:
    """Feed one API event to the engine's console progress, as the engine's hooks would."""
    if event.type == "metrics":
        progress.on_metrics(int(event.data.get("step", 0)), event.data)
    else:
        level = event.level if event.level in ("warning", "error") else "info"
        progress.on_event(EngineEvent(level, event.message, event.data))  # type: ignore[arg-type]
