"""`GET /quota`: the caller's team's limits and what it uses of each."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import DbDep, SettingsDep, TeamDep
from tuneq.quotas import service
from tuneq.quotas.schemas import QuotaPublic

router = APIRouter(prefix="/quota", tags=["quota"])


@router.get("", response_model=QuotaPublic)
def get_quota(team: TeamDep, db: DbDep, settings: SettingsDep) -> QuotaPublic:
    return QuotaPublic.model_validate(service.show(db, settings, team))
