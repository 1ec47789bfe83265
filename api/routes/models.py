"""`GET /models`: the base models this deployment can train, from the operator's registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import RegistryDep, SettingsDep, TeamDep
from peft_engine.methods import METHODS
from peft_engine.models.loading import model_dir, read_model_info
from tuneq.errors import NotFound

router = APIRouter(prefix="/models", tags=["models"])


def _describe(entry: Any, cache_dir: Any) -> dict[str, Any]:
    try:
        path = model_dir(entry, cache_dir, build=False)
    except Exception:  # noqa: BLE001 - a model whose files are missing is listed as unavailable
        path, available = None, False
    else:
        available = True
    info = read_model_info(path) if path is not None else None
    return {
        "id": entry.name,
        "object": "model",
        "description": entry.description,
        "source": entry.source.type,
        "tasks": list(entry.tasks),
        "methods": sorted(m.type for m in METHODS.values() if set(m.tasks) & set(entry.tasks)),
        "max_seq_length": info.max_position_embeddings if info else None,
        "available": available,
    }


@router.get("")
def list_models(_: TeamDep, registry: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    data = [_describe(e, settings.resolved_cache_dir) for e in registry.entries()]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{model_id}")
def get_model(
    model_id: str, _: TeamDep, registry: RegistryDep, settings: SettingsDep
) -> dict[str, Any]:
    if model_id not in registry:
        raise NotFound(f"no model {model_id!r} in this deployment's registry", param="model")
    return _describe(registry.get(model_id), settings.resolved_cache_dir)
