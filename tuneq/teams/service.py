"""Teams and their API keys. A key is shown once, at creation; only its SHA-256 is kept."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

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
