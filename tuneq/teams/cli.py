"""`tuneq admin create-key`, `list-keys` and `revoke-key`: an operator's hand on API keys.

What an operator does is in the team's audit trail too, with no key prefix. The services
are imported when a command runs, as tuneq/cli.py does: `tuneq --help` stays quick.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from tuneq.quotas.cli import parse_duration
from tuneq.settings import Settings


def register(admin_commands: Any) -> None:
    """Add the key commands to `tuneq admin`."""
    create = admin_commands.add_parser("create-key", help="create an API key for a team")
    create.add_argument("--team", required=True)
    create.add_argument("--name", help="what the team calls the key (shown in list-keys)")
    expiry = create.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-in", metavar="DURATION", type=_duration, help="e.g. 30d, 12h, 90m"
    )
    expiry.add_argument(
        "--expires-at", metavar="TIME", type=_time, help="RFC 3339, e.g. 2027-01-31T00:00:00Z"
    )
    create.set_defaults(run=_create_key)
    lister = admin_commands.add_parser(
        "list-keys", help="a team's keys: prefix, name, created, expires, revoked (never a key)"
    )
    lister.add_argument("--team", required=True)
    lister.set_defaults(run=_list_keys)
    revoke = admin_commands.add_parser("revoke-key", help="revoke the key with this prefix")
    revoke.add_argument("prefix", help="the prefix list-keys shows (or its start, if unique)")
    revoke.set_defaults(run=_revoke_key)


def _duration(text: str) -> timedelta:
    try:
        seconds = parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("must be at least 1 second")
    return timedelta(seconds=seconds)


def _time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone: {text}Z for UTC")
    return value


def _shown(value: datetime | None, none: str = "-") -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else none


def _create_key(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.audit.service import Actor
    from tuneq.db import make_engine, make_sessionmaker, transaction, utcnow
    from tuneq.teams.service import create_key, get_team_by_name

    expires_at = utcnow() + args.expires_in if args.expires_in else args.expires_at
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as db:
        team = get_team_by_name(db=db, name=args.team)
        row, key = create_key(
            db=db, team=team, name=args.name, expires_at=expires_at, actor=Actor(team.id)
        )
    expiry = f", expires {_shown(row.expires_at)}" if row.expires_at else ""
    print(
        f"API key {row.prefix} for team {team.name}{expiry} (shown once; only its hash is stored):"
    )
    print(key)


def _list_keys(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.db import make_engine, make_sessionmaker
    from tuneq.teams.service import all_keys, get_team_by_name

    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as db:
        rows = all_keys(db=db, team=get_team_by_name(db=db, name=args.team))
    table = [("PREFIX", "NAME", "CREATED", "EXPIRES", "REVOKED")] + [
        (r.prefix, r.name or "-", _shown(r.created_at), _shown(r.expires_at, "never"),
         _shown(r.revoked_at))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[n]) for row in table) for n in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _revoke_key(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.db import make_engine, make_sessionmaker, transaction
    from tuneq.teams.service import revoke_key

    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as db:
        row, team = revoke_key(db=db, prefix=args.prefix)
    print(
        f"revoked {row.prefix} of team {team.name} at {_shown(row.revoked_at)}; API processes "
        f"refuse it within TUNEQ_API_KEY_CACHE_SECONDS ({settings.api_key_cache_seconds:g} s)"
    )
