"""peft_engine: tuneq's training engine, usable alone (`python -m peft_engine`).

It trains from a job spec and local files and reports through hooks; it knows nothing of
HTTP, databases, Celery or object stores. Importing the package is cheap: torch loads only
when `train` is first used, so the API can validate specs and data with its modules.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["DataPaths", "Event", "Hooks", "TrainResult", "__version__", "load_trained", "train"]


def __getattr__(name: str) -> Any:
    if name in {"train", "TrainResult"}:
        from peft_engine import training

        return getattr(training, name)
    if name == "DataPaths":
        from peft_engine.prepare import DataPaths

        return DataPaths
    if name == "load_trained":
        from peft_engine.methods.weights import load_trained

        return load_trained
    if name in {"Event", "Hooks"}:
        from peft_engine import hooks

        return getattr(hooks, name)
    raise AttributeError(name)
