"""What the API takes and shows for a team's API keys (`/keys`): never the secret, but in
the answer that creates it."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict
from pydantic import Field as Member

from tuneq.documents import unix_seconds
from tuneq.errors import field_error
from tuneq.teams.models import ApiKey

MAX_LIFETIME_SECONDS = 10 * 365 * 86_400


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Member(None, min_length=1, max_length=100, examples=["ci-2026-12"])
    expires_in_seconds: int | None = Member(
        None, ge=1, le=MAX_LIFETIME_SECONDS, description="the key expires this long from now"
    )
    expires_at: AwareDatetime | None = Member(
        None, description="the key expires then (RFC 3339, with a time zone)"
    )

    def expiry(self, now: datetime) -> datetime | None:
        """When the key expires (None: never); both ways of saying it at once is refused."""
        if self.expires_in_seconds is not None and self.expires_at is not None:
            raise field_error("expires_at", "give expires_in_seconds or expires_at, not both")
        if self.expires_in_seconds is not None:
            return now + timedelta(seconds=self.expires_in_seconds)
        return self.expires_at


def key_status(row: ApiKey, now: datetime) -> Literal["active", "expired", "revoked"]:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


class ApiKeyPublic(BaseModel):
    object: Literal["api_key"] = "api_key"
    prefix: str = Member(description="how the key is named in lists, DELETE and the audit trail")
    name: str | None
    status: Literal["active", "expired", "revoked"]
    current: bool = Member(description="whether this is the key the request was sent with")
    created_at: int = Member(description="unix seconds")
    expires_at: int | None = Member(description="unix seconds; null: never")
    revoked_at: int | None = Member(description="unix seconds; null: not revoked")

    @classmethod
    def of(cls, row: ApiKey, *, now: datetime, current: bool, **extra: Any) -> Self:
        return cls(
            prefix=row.prefix,
            name=row.name,
            status=key_status(row, now),
            current=current,
            created_at=unix_seconds(row.created_at) or 0,
            expires_at=unix_seconds(row.expires_at),
            revoked_at=unix_seconds(row.revoked_at),
            **extra,
        )


class ApiKeyCreated(ApiKeyPublic):
    key: str | None = Member(
        description="the key itself, shown in this answer only; null when the answer is "
        "replayed for a repeated Idempotency-Key (the key is never stored: revoke it by its "
        "prefix and create another if it was lost)"
    )


class ApiKeyRevoked(ApiKeyPublic):
    note: str | None = Member(None, description="set when the revoked key is the request's own")


class ApiKeysPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyPublic]
    has_more: bool
