"""The base models a deployment offers (`GET /models`), read from the operator's registry.

Torch-free: it reads registry entries and config.json files, never weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peft_engine.errors import UserError
from peft_engine.methods import METHODS
from peft_engine.models import ModelEntry, ModelRegistry
from peft_engine.models.loading import model_dir, read_model_info
from tuneq.errors import NotFound


def describe_model(entry: ModelEntry, cache_dir: Path) -> dict[str, Any]:
    """What a user needs to choose a model: tasks, methods, context length, availability."""
    try:
        path = model_dir(entry, cache_dir, build=False)
        available = True
    except UserError:  # its files are missing on this deployment
        path, available = None, False
    info = read_model_info(path) if path is not None else None
    return {
        "id": entry.name,
        "object": "model",
        "description": entry.description,
        "source": entry.source.type,
        "tasks": list(entry.tasks),
        "methods": sorted(m.type for m in METHODS.values() if set(m.tasks) & set(entry.tasks)),
        "max_seq_length": info.max_position_embeddings if info else None,
        "queue": entry.queue,
        "available": available,
    }


def list_models(registry: ModelRegistry, cache_dir: Path) -> list[dict[str, Any]]:
    return [describe_model(entry, cache_dir) for entry in registry.entries()]


def get_model(registry: ModelRegistry, cache_dir: Path, model_id: str) -> dict[str, Any]:
    if model_id not in registry:
        raise NotFound(f"no model {model_id!r} in this deployment's registry", param="model")
    return describe_model(registry.get(model_id), cache_dir)
