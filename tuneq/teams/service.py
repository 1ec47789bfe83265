"""Teams and their API keys. A key is shown once, at creation; only its SHA-256 is kept.

A key is `tq_`, 43 random base62 characters (256 bits) and a 6-character checksum (the
CRC32 of the random part, in base62), as GitHub's tokens: a key mistyped or cut short is
told apart from a revoked one without a database lookup, and a secret scanner can tell a
real key from look-alikes. The checksum is not a secret and proves nothing: only the hash
lookup does. Keys made before checksums (`tq_` + 43 URL-safe characters) keep working.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached, sessionmaker

from tuneq.audit.service import Actor, record
from tuneq.db import transaction, utcnow
from tuneq.errors import Conflict, NotFound, Unauthorized, field_error
from tuneq.idempotency.service import idempotent, request_hash
from tuneq.ids import new_id
from tuneq.teams.models import ApiKey, Team
from tuneq.teams.schemas import ApiKeyCreated, KeyCreate

KEY_PREFIX = "tq_"
CREATE_KEY = "POST /keys"  # the use case's name under an Idempotency-Key
_SHOWN_CHARS = 10  # "tq_" + 7 characters: enough to tell keys apart in a list
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS = 43  # 62**43 > 2**256
_CHECKSUM_CHARS = 6  # 62**6 > 2**32
_KEY_LENGTH = len(KEY_PREFIX) + _RANDOM_CHARS + _CHECKSUM_CHARS
_LEGACY_LENGTH = len(KEY_PREFIX) + 43  # secrets.token_urlsafe(32), before checksums
_MALFORMED = (
    "the API key is malformed (likely mistyped or cut short): it is not a 'tq_' key with a "
    "matching checksum; copy it again"
)


def hash_key(key: str) -> str:
    # Keys are 256 random bits: a plain SHA-256 cannot be brute-forced, and lookups stay O(1).
    return hashlib.sha256(key.encode()).hexdigest()


def key_prefix(key: str) -> str:
    """What lists and the audit trail show of a key."""
    return key[:_SHOWN_CHARS]


def _checksum(body: str) -> str:
    value, digits = zlib.crc32(body.encode()), []
    for _ in range(_CHECKSUM_CHARS):
        value, digit = divmod(value, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def _is_base62(text: str) -> bool:
    return text.isascii() and text.isalnum()


def new_key() -> str:
    body = "".join(secrets.choice(_BASE62) for _ in range(_RANDOM_CHARS))
    return KEY_PREFIX + body + _checksum(body)


def check_key_form(key: str) -> None:
    """Refuse, without asking the database, what cannot be a key."""
    if not key.startswith(KEY_PREFIX):
        raise Unauthorized(_MALFORMED)
    if len(key) == _LEGACY_LENGTH:
        return  # made before checksums: only the lookup can tell
    body, checksum = key[len(KEY_PREFIX) : -_CHECKSUM_CHARS], key[-_CHECKSUM_CHARS:]
    if len(key) != _KEY_LENGTH or not _is_base62(body) or _checksum(body) != checksum:
        raise Unauthorized(_MALFORMED)


def create_team(*, db: Session, name: str) -> Team:
    if db.scalar(select(Team).where(Team.name == name)) is not None:
        raise Conflict(f"team {name!r} already exists", param="name")
    team = Team(id=new_id("team"), name=name)
    db.add(team)
    db.flush()
    return team


def find_team(*, db: Session, name: str) -> Team | None:
    return db.scalar(select(Team).where(Team.name == name))


def get_team_by_name(*, db: Session, name: str) -> Team:
    team = find_team(db=db, name=name)
    if team is None:
        raise NotFound(f"no team named {name!r}", param="team")
    return team


def create_key(
    *,
    db: Session,
    team: Team,
    name: str | None = None,
    expires_at: datetime | None = None,
    actor: Actor | None = None,
) -> tuple[ApiKey, str]:
    """A new key for the team: the row, and the key itself (never stored)."""
    if expires_at is not None and expires_at <= utcnow():
        raise field_error("expires_at", "must be in the future")
    key = new_key()
    row = ApiKey(
        id=new_id("key"),
        team_id=team.id,
        prefix=key_prefix(key),
        key_hash=hash_key(key),
        name=name,
        expires_at=expires_at,
    )
    db.add(row)
    db.flush()
    record(db, actor, "key.create", row.prefix)
    return row, key


def create_team_key(
    *,
    sessions: sessionmaker[Session],
    team: Team,
    body: KeyCreate,
    actor: Actor | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    """`POST /keys`: a new key for the caller's team, as `ApiKeyCreated` JSON. The answer
    stored under the Idempotency-Key leaves the key out (only its hash is ever stored), so
    a replay shows which key was made, with `key` null."""
    fingerprint = request_hash(CREATE_KEY, body.model_dump_json())
    with idempotent(
        sessions,
        team_id=team.id,
        key=idempotency_key,
        method_path=CREATE_KEY,
        fingerprint=fingerprint,
    ) as request:
        if request.replay is not None:
            return request.replay.body
        with transaction(sessions) as db:
            now = utcnow()
            row, key = create_key(
                db=db, team=team, name=body.name, expires_at=body.expiry(now), actor=actor
            )
            stored = ApiKeyCreated.of(row, now=now, current=False, key=None)
            request.record(db, 201, stored.model_dump(mode="json"))
    return stored.model_copy(update={"key": key}).model_dump(mode="json")


def all_keys(*, db: Session, team: Team) -> list[ApiKey]:
    """Every key of the team, newest first (the operator's list)."""
    return list(
        db.scalars(select(ApiKey).where(ApiKey.team_id == team.id).order_by(ApiKey.id.desc()))
    )


def list_keys(
    *, db: Session, team: Team, limit: int, after: str | None = None
) -> tuple[list[ApiKey], bool]:
    """A page of the team's keys (revoked and expired ones too), newest first, after the
    key whose prefix is `after` (none after a prefix the team has no key under), and
    whether more follow."""
    query = select(ApiKey).where(ApiKey.team_id == team.id)
    if after is not None:
        cursor = db.scalar(query.where(ApiKey.prefix == after).order_by(ApiKey.id).limit(1))
        query = query.where(ApiKey.id < (cursor.id if cursor is not None else ""))
    rows = list(db.scalars(query.order_by(ApiKey.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def revoke_team_key(*, db: Session, team: Team, prefix: str, actor: Actor | None) -> ApiKey:
    """Revoke the team's key with this prefix (another team's is as missing as one that
    never existed). Revoking a revoked key changes nothing and records nothing."""
    rows = list(
        db.scalars(select(ApiKey).where(ApiKey.team_id == team.id, ApiKey.prefix == prefix))
    )
    if not rows:
        raise NotFound(f"no key {prefix!r}", param="prefix")
    return _revoke(db, _only(rows, prefix), actor)


def revoke_key(*, db: Session, prefix: str) -> tuple[ApiKey, Team]:
    """The operator's revoke (recorded with no key): the one key, of any team, whose prefix
    starts with `prefix`."""
    if len(prefix) <= len(KEY_PREFIX):
        raise field_error("prefix", f"give more than {KEY_PREFIX!r}: the prefix list-keys shows")
    rows = list(db.scalars(select(ApiKey).where(ApiKey.prefix.startswith(prefix, autoescape=True))))
    if not rows:
        raise NotFound(f"no key starts with {prefix!r}", param="prefix")
    row = _only(rows, prefix)
    team = db.get(Team, row.team_id)
    assert team is not None  # foreign key
    return _revoke(db, row, Actor(team.id)), team


def _only(rows: list[ApiKey], prefix: str) -> ApiKey:
    if len(rows) > 1:
        found = ", ".join(sorted(row.prefix for row in rows))
        raise Conflict(
            f"{len(rows)} keys match {prefix!r} ({found}): give a longer prefix", param="prefix"
        )
    return rows[0]


def _revoke(db: Session, row: ApiKey, actor: Actor | None) -> ApiKey:
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        db.flush()
        record(db, actor, "key.revoke", row.prefix)
    return row


@dataclass(frozen=True)
class VerifiedKey:
    """A key found valid: its team, and when it stops being valid (None: never)."""

    team: Team
    expires_at: datetime | None


def authenticate(*, db: Session, key: str) -> VerifiedKey:
    """The key's team, or Unauthorized: malformed (told without the database), or not valid.

    Saying why a well-formed key is not valid (revoked, expired) tells the reason only to
    whoever holds the key itself (its hash must match a row); an unknown key, or a guess,
    gets the plain answer.
    """
    check_key_form(key)
    row = db.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if row is None:
        raise Unauthorized("the API key is not valid")
    if row.revoked_at is not None:
        raise Unauthorized("the API key is not valid: it was revoked")
    if row.expires_at is not None and row.expires_at <= utcnow():
        raise Unauthorized("the API key is not valid: it expired")
    team = db.get(Team, row.team_id)
    assert team is not None  # foreign key
    return VerifiedKey(team, row.expires_at)


@dataclass(frozen=True)
class _Verified:
    team: Team  # detached, loaded; shared by the requests that present the key: read only
    until: float  # on the cache's clock
    prefix: str


class VerifiedKeys:
    """API keys this process verified in the last `ttl_seconds`, with their teams.

    Verifying a key is two queries; a status poller sends the same key many times a
    second. Only keys found valid are kept (a new key works at once, and bad keys cannot
    fill the cache), under their SHA-256, never the key itself. Revoking or deleting a key
    is a database write that no other process hears of: each API process keeps trusting
    the key until its entry expires, `ttl_seconds` at most after it was verified (0: no
    cache, every request reads the database). A key that expires sooner is kept only
    until it expires. Used from the event loop only.
    """

    def __init__(
        self,
        ttl_seconds: float,
        *,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Verified] = {}

    def team_for(self, key: str) -> Team | None:
        """The key's team when it was verified recently enough; None: ask the database."""
        entry = self._entries.get(hash_key(key))
        if entry is None or entry.until <= self._clock():
            return None
        return entry.team

    def remember(self, key: str, team: Team, *, expires_at: datetime | None = None) -> None:
        ttl = self.ttl_seconds
        if expires_at is not None:  # never trusted past its expiry
            ttl = min(ttl, (expires_at - utcnow()).total_seconds())
        if ttl <= 0:
            return
        now = self._clock()
        if len(self._entries) >= self.max_entries:
            self._entries = {h: e for h, e in self._entries.items() if e.until > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # that many live keys in one process: start over
        copy = Team(id=team.id, name=team.name, created_at=team.created_at)
        make_transient_to_detached(copy)  # as `authenticate` returns it: loaded, no session
        self._entries[hash_key(key)] = _Verified(copy, now + ttl, key_prefix(key))

    def forget(self, prefix: str) -> None:
        """Stop trusting the key with this prefix here at once (it was revoked through this
        process; the others still trust it until their entries expire)."""
        self._entries = {h: e for h, e in self._entries.items() if e.prefix != prefix}
