"""The base models a deployment offers (`GET /models`), read from the operator's registry.

Torch-free: it reads registry entries, config.json files and the headers of safetensors
files, never weights. Each model lists the methods usable with it and, per task, which of
them support that task; a method that names model families (`MethodDef.families`) is
offered only for those families, and a model whose family is unknown is taken to suit
every method (the engine checks again)."""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from peft_engine.errors import UserError
from peft_engine.methods import METHODS, MethodDef
from peft_engine.models import ModelEntry, ModelRegistry
from peft_engine.models.loading import model_dir, read_model_info
from tuneq.errors import NotFound


def supported(method: MethodDef, entry: ModelEntry, task: str) -> str | None:
    """None when `method` can train `entry` for `task`; otherwise why not, for a person.

    The same rules as the engine's `check_support`: the model offers the task, the method
    supports the task, and the method works on the model's family (an unknown family is
    not held against it).
    """
    if task not in entry.tasks:
        return (
            f"model {entry.name!r} does not support task {task!r} "
            f"(it supports: {', '.join(entry.tasks)})"
        )
    if task not in method.tasks:
        return (
            f"method {method.type!r} does not support task {task!r} "
            f"(it supports: {', '.join(method.tasks)})"
        )
    families = method.families
    if entry.family is not None and families is not None and entry.family not in families:
        return (
            f"method {method.type!r} does not support model family {entry.family!r} "
            f"(it supports: {', '.join(families)})"
        )
    return None


def support_table(
    entry: ModelEntry, methods: Iterable[MethodDef] | None = None
) -> dict[str, list[str]]:
    """For each task of the model, the method types that can train it, sorted."""
    available = list(METHODS.values() if methods is None else methods)
    return {
        task: sorted(m.type for m in available if supported(m, entry, task) is None)
        for task in entry.tasks
    }


# The tasks whose inputs are images: no tokens, so no context length.
IMAGE_TASKS = frozenset({"image_classification"})
# Batch norm statistics are stored beside the weights but are not parameters.
_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def describe_model(entry: ModelEntry, cache_dir: Path) -> dict[str, Any]:
    """What a user needs to choose a model: tasks, methods, size, context length (text
    models), availability."""
    try:
        path = model_dir(entry, cache_dir, build=False)
        available = True
    except UserError:  # its files are missing on this deployment
        path, available = None, False
    text = not IMAGE_TASKS.issuperset(entry.tasks)
    info = read_model_info(path) if path is not None and text else None
    support = support_table(entry)
    return {
        "id": entry.name,
        "object": "model",
        "description": entry.description,
        "source": entry.source.type,
        "tasks": list(entry.tasks),
        "methods": sorted({method for methods in support.values() for method in methods}),
        "support": support,
        "parameters": parameter_count(path) if path is not None else None,
        "max_seq_length": info.max_position_embeddings if info else None,
        "queue": entry.queue,
        "available": available,
    }


def parameter_count(path: Path) -> int | None:
    """The weights in a model directory's safetensors files, from their headers alone; None
    when it has none (a model stored otherwise is still listed)."""
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        return None
    try:
        counts = [_shard_count(str(f), f.stat().st_mtime_ns) for f in shards]
    except (OSError, ValueError):
        return None
    return sum(counts)


@functools.lru_cache(maxsize=256)
def _shard_count(file: str, _mtime_ns: int) -> int:
    """A safetensors file starts with its header's length (8 bytes) and the JSON header."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sum(
        math.prod(tensor["shape"])
        for name, tensor in header.items()
        if name != "__metadata__" and not name.endswith(_STATISTICS)
    )


def list_models(registry: ModelRegistry, cache_dir: Path) -> list[dict[str, Any]]:
    """Every model of the registry, described, in name order."""
    return [describe_model(entry, cache_dir) for entry in registry.entries()]


def get_model(registry: ModelRegistry, cache_dir: Path, model_id: str) -> dict[str, Any]:
    """One model, described; NotFound when the registry has no such name."""
    if model_id not in registry:
        raise NotFound(f"no model {model_id!r} in this deployment's registry", param="model")
    return describe_model(registry.get(model_id), cache_dir)
