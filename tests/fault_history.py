"""The offline history checker of the fault runs (issue 17).

Each worker of a fault run appends what it did to the job table to TUNEQ_HISTORY_LOG, one
JSON object a line, after the write committed (worker/history.py):

    {"kind": "claim"|"renew"|"checkpoint"|"release"|"end", "job": id, "attempt": n,
     "fence": f, "owner": str, "pid": int, "db_time": float, "expires": float|null,
     "step": int|null, "state": str|null}

`db_time` is the database's clock inside the write's transaction and `expires` the lease
expiry the database granted (claim and renew), so the records of every process sit on one
clock. `check_history` reads them against the invariants of DESIGN §3:

(a) at most one live lease per job: attempt k's lease is live from its claim until the
    earlier of its last granted expiry and its release or end; the next claim comes after;
(b) no write under an old fence: every renew, checkpoint, release and end carries the
    highest fence claimed for its job at or before its time;
(c) fences strictly increase across a job's claims;
(d) every accepted job ended: succeeded, failed or cancelled.

The reaper's moves are not in the log; the final states come from the API.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WRITES = frozenset({"renew", "checkpoint", "release", "end"})
RESUMED = re.compile(r"resuming from the checkpoint of step (\d+) \(attempt (\d+)\)")

Record = Mapping[str, Any]


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a history log; a last line torn by a killed process is left out."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise
    return records


def check_history(records: Iterable[Record], final_states: Mapping[str, str]) -> list[str]:
    """The invariants the records and the jobs' final states break; empty when none."""
    by_job = _by_job(records)
    violations = lease_overlaps(by_job)
    for job, history in sorted(by_job.items()):
        violations += _stale_writes(job, history) + _fences_not_increasing(job, history)
    violations += [
        f"job {job}: ended {state!r}, not a terminal state"
        for job, state in sorted(final_states.items())
        if state not in TERMINAL
    ]
    return violations


def duplicates(records: Iterable[Record]) -> int:
    """How many times a job was claimed while an earlier attempt's lease was still live."""
    return len(lease_overlaps(_by_job(records)))


def lease_overlaps(by_job: Mapping[str, list[Record]]) -> list[str]:
    """Invariant (a), for records grouped by job (each list in db_time order)."""
    violations = []
    for job, history in sorted(by_job.items()):
        claims = sorted((r for r in history if r["kind"] == "claim"), key=lambda r: r["fence"])
        for earlier, later in zip(claims, claims[1:], strict=False):
            until = _lease_end(earlier, history)
            if later["db_time"] < until:
                violations.append(
                    f"job {job}: attempt {later['attempt']} (fence {later['fence']}) claimed "
                    f"at {later['db_time']:.3f} while attempt {earlier['attempt']} (fence "
                    f"{earlier['fence']}) held its lease until {until:.3f}"
                )
    return violations


def checkpoint_steps_lost(
    train_steps: Iterable[tuple[int, int]], event_messages: Iterable[str]
) -> int:
    """Steps trained again because a later attempt started behind where an earlier one got.

    `train_steps` are the job's (attempt, step) training-metric rows; `event_messages`
    its events, where "resuming from the checkpoint of step N (attempt k)" says attempt k
    started from step N. An attempt k > 1 that trained with no such event started from 0.
    Sums, over those attempts, the highest step any earlier attempt reached minus k's start.
    """
    reached: dict[int, int] = defaultdict(int)
    for attempt, step in train_steps:
        reached[attempt] = max(reached[attempt], step)
    starts = {int(match[2]): int(match[1]) for m in event_messages if (match := RESUMED.search(m))}
    lost = 0
    for attempt in sorted(set(reached) | set(starts)):
        before = max((s for a, s in reached.items() if a < attempt), default=0)
        if attempt > 1:
            lost += max(0, before - starts.get(attempt, 0))
    return lost


def _by_job(records: Iterable[Record]) -> dict[str, list[Record]]:
    by_job: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_job[record["job"]].append(record)
    for history in by_job.values():
        history.sort(key=lambda r: (r["db_time"], r["kind"] != "claim"))
    return dict(by_job)


def _lease_end(claim: Record, history: list[Record]) -> float:
    """When the lease `claim` took stopped being live: its last granted expiry, or its
    release or end when that came first."""
    own = [r for r in history if r["fence"] == claim["fence"]]
    granted = [r["expires"] for r in own if r["kind"] in ("claim", "renew") and r["expires"]]
    ended = [r["db_time"] for r in own if r["kind"] in ("release", "end")]
    return min([max(granted, default=claim["db_time"]), *ended])


def _stale_writes(job: str, history: list[Record]) -> list[str]:
    """Invariant (b): each write carries the job's highest fence claimed by then."""
    violations, current = [], None
    for record in history:
        if record["kind"] == "claim":
            current = record["fence"] if current is None else max(current, record["fence"])
        elif record["kind"] in WRITES and record["fence"] != current:
            violations.append(
                f"job {job}: {record['kind']} of attempt {record['attempt']} at "
                f"{record['db_time']:.3f} under fence {record['fence']}, the current fence "
                f"being {current}"
            )
    return violations


def _fences_not_increasing(job: str, history: list[Record]) -> list[str]:
    """Invariant (c): in time order, each claim's fence is above the one before."""
    claims = [r for r in history if r["kind"] == "claim"]
    return [
        f"job {job}: claim at {later['db_time']:.3f} took fence {later['fence']}, not above "
        f"the earlier claim's {earlier['fence']}"
        for earlier, later in zip(claims, claims[1:], strict=False)
        if later["fence"] <= earlier["fence"]
    ]
