"""`tuneq admin set-quota` and `show-quota`: an operator's quotas per team."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from typing import Any

from tuneq.settings import Settings

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}  # fmt: skip
_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Option, quota name, how its value is read.
_OPTIONS = (
    ("--running-jobs", "running_jobs", int),
    ("--queued-jobs", "queued_jobs", int),
    ("--stored-bytes", "stored_bytes", "bytes"),
    ("--gpu-seconds", "gpu_seconds", "duration"),
    ("--gpu-window", "gpu_window_seconds", "duration"),
)


def register(admin_commands: Any) -> None:
    """Add the quota commands to `tuneq admin`."""
    setter = admin_commands.add_parser(
        "set-quota",
        help="set a team's quotas (a value of `default` clears one back to the Settings default)",
    )
    setter.add_argument("--team", required=True)
    for option, _, kind in _OPTIONS:
        example = {"bytes": " (e.g. 50GiB)", "duration": " (e.g. 3600, 90m, 7d)"}.get(kind, "")
        setter.add_argument(option, metavar="N", help=f"{option[2:]}{example}")
    setter.set_defaults(run=_set_quota)
    shower = admin_commands.add_parser("show-quota", help="a team's quotas and usage, as JSON")
    shower.add_argument("--team", required=True)
    shower.set_defaults(run=_show_quota)


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500000000, 20GB, 50GiB)")
    return int(match[1]) * _UNITS[match[2] or ""]


def parse_duration(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])?\s*", text.lower())
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 3600, 90m, 12h, 7d)")
    return int(match[1]) * _DURATIONS[match[2] or "s"]


def _changes(args: argparse.Namespace) -> dict[str, int | None]:
    readers: dict[Any, Callable[[str], int]] = {
        int: int,
        "bytes": parse_bytes,
        "duration": parse_duration,
    }
    changes: dict[str, int | None] = {}
    for option, name, kind in _OPTIONS:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is None:
            continue
        try:
            parsed = None if value == "default" else readers[kind](value)
        except ValueError as err:
            raise SystemExit(f"error: {option}: {err}") from None
        if parsed is not None and parsed < (1 if kind == "duration" else 0):
            raise SystemExit(f"error: {option}: must be at least 1")
        changes[name] = parsed
    if not changes:
        raise SystemExit("error: name at least one quota to set, e.g. --running-jobs 2")
    return changes


def _set_quota(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.db import make_engine, make_sessionmaker, transaction
    from tuneq.quotas.service import set_quota, show
    from tuneq.teams.service import get_team_by_name

    changes = _changes(args)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as db:
        team = get_team_by_name(db=db, name=args.team)
        set_quota(db, team, changes)
        shown = show(db, settings, team)
    print(json.dumps(shown, indent=2))


def _show_quota(settings: Settings, args: argparse.Namespace) -> None:
    from tuneq.db import make_engine, make_sessionmaker
    from tuneq.quotas.service import show
    from tuneq.teams.service import get_team_by_name

    engine = make_engine(settings.resolved_database_url)
    with make_sessionmaker(engine)() as db:
        print(json.dumps(show(db, settings, get_team_by_name(db=db, name=args.team)), indent=2))
