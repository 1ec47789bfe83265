"""Idempotency-Key for creating POSTs (DESIGN §3, Stripe's rules).

Same key + same body → the stored response; same key + another body → 422; a request
still in progress under the key → 409. The key is claimed in its own short transaction,
and the response is stored in the same transaction as the object it created.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tuneq.db import transaction, utcnow
from tuneq.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidRequest
from tuneq.idempotency.models import IdempotencyKey

MAX_KEY_LENGTH = 255
# A claim this old without a response belongs to a request that died: it may be retaken.
_ABANDONED_AFTER = timedelta(minutes=10)


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any


def request_hash(*parts: bytes | str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()


def claim_key(
    sessions: sessionmaker[Session], *, team_id: str, key: str, method_path: str, fingerprint: str
) -> IdempotencyKey | StoredResponse:
    """The claimed key row (go ahead), or the response a finished earlier request gave."""
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters", param="Idempotency-Key"
        )
    for _ in range(2):
        try:
            with transaction(sessions) as db:
                row = IdempotencyKey(
                    team_id=team_id, key=key, method_path=method_path, request_hash=fingerprint
                )
                db.add(row)
            return row
        except IntegrityError:
            with transaction(sessions) as db:
                existing = db.scalar(
                    select(IdempotencyKey).where(
                        IdempotencyKey.team_id == team_id, IdempotencyKey.key == key
                    )
                )
                if existing is None:
                    continue  # released between our insert and this read: try again
                if existing.request_hash != fingerprint or existing.method_path != method_path:
                    raise IdempotencyKeyReused(
                        "this Idempotency-Key was used with a different request",
                        param="Idempotency-Key",
                    ) from None
                if existing.response_status is not None:
                    return StoredResponse(existing.response_status, existing.response_body)
                if utcnow() - existing.created_at < _ABANDONED_AFTER:
                    raise IdempotencyKeyInUse(
                        "a request with this Idempotency-Key is still in progress; retry later",
                        param="Idempotency-Key",
                    ) from None
                db.delete(existing)  # abandoned: take it over on the next pass
    raise IdempotencyKeyInUse("could not claim the Idempotency-Key", param="Idempotency-Key")


def record_response(db: Session, claimed: IdempotencyKey, status: int, body: Any) -> None:
    """Store the response in the caller's transaction, beside the object it created."""
    row = db.get(IdempotencyKey, claimed.id)
    assert row is not None
    row.response_status = status
    row.response_body = body


def release_key(sessions: sessionmaker[Session], claimed: IdempotencyKey) -> None:
    """The request failed before creating anything: the key may be used again."""
    with transaction(sessions) as db:
        db.execute(delete(IdempotencyKey).where(IdempotencyKey.id == claimed.id))


def purge_expired(db: Session, *, older_than: timedelta) -> int:
    result = db.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < utcnow() - older_than)
    )
    return result.rowcount or 0


@dataclass
class IdempotentRequest:
    """What a creating request does under its key: replay a stored response, or record one."""

    replay: StoredResponse | None
    _claimed: IdempotencyKey | None

    def record(self, db: Session, status: int, body: Any) -> None:
        if self._claimed is not None:
            record_response(db, self._claimed, status, body)


@contextmanager
def idempotent(
    sessions: sessionmaker[Session],
    *,
    team_id: str,
    key: str | None,
    method_path: str,
    fingerprint: str,
) -> Iterator[IdempotentRequest]:
    """Claim the key (when one was sent) before any work; free it if the work fails.

    A finished earlier request under the same key comes back as `replay`, before the
    request is validated again: the world may have changed since (a file deleted), and
    the client must still get the answer it was given.
    """
    if key is None:
        yield IdempotentRequest(None, None)
        return
    claimed = claim_key(
        sessions, team_id=team_id, key=key, method_path=method_path, fingerprint=fingerprint
    )
    if isinstance(claimed, StoredResponse):
        yield IdempotentRequest(claimed, None)
        return
    try:
        yield IdempotentRequest(None, claimed)
    except BaseException:
        release_key(sessions, claimed)
        raise
