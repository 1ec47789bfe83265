"""Teams and their API keys. A key is shown once, at creation; only its SHA-256 is kept."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, make_transient_to_detached

from tuneq.errors import Conflict, NotFound, Unauthorized
from tuneq.ids import new_id
from tuneq.teams.models import ApiKey, Team

KEY_PREFIX = "tq_"
_SHOWN_CHARS = 10  # "tq_" + 7 characters: enough to tell keys apart in a list


def hash_key(key: str) -> str:
    # Keys are 256 random bits: a plain SHA-256 cannot be brute-forced, and lookups stay O(1).
    return hashlib.sha256(key.encode()).hexdigest()


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


def create_key(*, db: Session, team: Team) -> tuple[ApiKey, str]:
    """A new key for the team: the row, and the key itself (never stored)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=new_id("key"), team_id=team.id, prefix=key[:_SHOWN_CHARS], key_hash=hash_key(key)
    )
    db.add(row)
    db.flush()
    return row, key


def authenticate(*, db: Session, key: str) -> Team:
    """The team a key belongs to, or Unauthorized (the same error for every kind of bad key)."""
    row = db.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    )
    if row is None:
        raise Unauthorized("the API key is not valid")
    team = db.get(Team, row.team_id)
    assert team is not None  # foreign key
    return team


@dataclass(frozen=True)
class _Verified:
    team: Team  # detached, loaded; shared by the requests that present the key: read only
    until: float  # on the cache's clock


class VerifiedKeys:
    """API keys this process verified in the last `ttl_seconds`, with their teams.

    Verifying a key is two queries; a status poller sends the same key many times a
    second. Only keys found valid are kept (a new key works at once, and bad keys cannot
    fill the cache), under their SHA-256, never the key itself. Revoking or deleting a key
    is a database write that no other process hears of: each API process keeps trusting
    the key until its entry expires, `ttl_seconds` at most after it was verified (0: no
    cache, every request reads the database). Used from the event loop only.
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

    def remember(self, key: str, team: Team) -> None:
        if self.ttl_seconds <= 0:
            return
        now = self._clock()
        if len(self._entries) >= self.max_entries:
            self._entries = {h: e for h, e in self._entries.items() if e.until > now}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()  # that many live keys in one process: start over
        copy = Team(id=team.id, name=team.name, created_at=team.created_at)
        make_transient_to_detached(copy)  # as `authenticate` returns it: loaded, no session
        self._entries[hash_key(key)] = _Verified(copy, now + self.ttl_seconds)
