"""`GET /models`: the base models this deployment can train, from the operator's registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import RegistryDep, SettingsDep, TeamDep
from api.openapi_docs import responses
from tuneq import catalog

router = APIRouter(prefix="/models", tags=["models"])


@router.get("")
def list_models(_: TeamDep, registry: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    data = catalog.list_models(registry, settings.resolved_cache_dir)
    return {"object": "list", "data": data, "has_more": False}


@router.get("/{model_id}", responses=responses((404, "no model of that name in the registry")))
def get_model(
    model_id: str, _: TeamDep, registry: RegistryDep, settings: SettingsDep
) -> dict[str, Any]:
    return catalog.get_model(registry, settings.resolved_cache_dir, model_id)
