"""The control plane for a thousand workers (issue 19): N simulated workers' claims and
lease heartbeats against the real PostgreSQL, no training.

    .venv/bin/python bench/lease_scale.py                  # the README's table, ~7 minutes
    .venv/bin/python bench/lease_scale.py --workers 10,100 --seconds 10 --intervals 10

A fresh database on the machine's PostgreSQL (found or started as the tests do,
tests/infra.py; dropped at the end), migrated, with `--teams` teams and a backlog of
`--backlog` queued jobs (rows as tests/service_fixtures.py's `insert_job` makes them, with
a spec of a real job's size and the outbox row the relay marked sent), topped up before
each phase. A simulated worker runs the worker's own code: its claim is
`tuneq.quotas.fair_share.claim_next` in one transaction, as `JobRunner._claim` calls it;
its heartbeat is a `worker.heartbeat.Heartbeat` whose `beat()` (renew_lease under the
fence, with a progress document) is called when due; a job ends with the fenced write to
`succeeded`. The broker is an in-memory deque of the jobs' ids, one message a job.

Connections: a real worker process holds its own pool (`tuneq.db.make_engine`), so 1,000
worker processes would open 1,000 or more connections; this server allows
`max_connections` (the line after the table says how many, and how many others held). The N
simulated workers are multiplexed over `--connections` connections at most: groups of up
to 10, each group one `make_engine` pool (a worker host's) served by as many threads,
which take the due actions of their workers from a timer heap. That is what N workers
behind PgBouncer in transaction mode with a pool of that size would see; a beat's time
counts its wait for a free connection.

Two phases for each N:

- `claims`: every worker claims, ends the job at once and claims again, never pausing:
  the claims/s the database sustains with that many claimers (the ceiling; a real job
  lasts minutes). `claim ms` is the claim transaction itself (p50/p99); `empty` counts
  claims that found nothing although jobs were queued.
- `steady @Is`: all N workers claim at once (a cold start; `start s` is how long until all
  held a job), then for `--seconds` each renews its lease every I seconds (the lease is
  3 I, as `TUNEQ_LEASE_TTL_SECONDS` gives I = lease/3; the first beats spread over one
  interval, as in a fleet whose jobs started at different times; beats that fall due
  during a long cold start wait behind its claims), and its job ends after an exponential
  time of mean `--job-seconds` and it claims the next. `beat ms` and, here, `claim ms` are
  from falling due to the commit (p50/p99; a beat's is what counts against the lease); I is the
  deployment's (Settings' lease / 3) for every N, and each of `--intervals` for the
  largest N.

`DB CPU` is the CPU time of this database's PostgreSQL backends plus the server's WAL
writer, checkpointer and background writer, from /proc/<pid>/stat (utime + stime) at the
window's start and end, in cores (1.00 = one core busy); `bench CPU` is this process's (the
simulated workers, on the same machine). `HOT` is the share of the phase's heartbeat
UPDATEs that were HOT (heap-only: no index entry written, pg_stat_user_tables'
n_tup_hot_upd over the renewals that matched; a claim or an end changes `state`, which the
indexes hold, so only beats can be HOT), read once the phase's connections have closed
(a backend's counters reach the statistics when it exits, or up to seconds later while it
lives). The planner's statistics are gathered once after seeding (ANALYZE, committed), as
autovacuum would; this server's autovacuum may be off, as it is on the machine of the
README's figures. Nothing is asserted; tests/test_lease_scale.py checks the invariants at
tiny N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.infra: PostgreSQL found or started as in tests

from bench.lease_sim import (  # noqa: E402
    Simulation,
    Tally,
    add_teams,
    close_groups,
    open_groups,
    top_up,
)
from tuneq.db import make_engine, make_sessionmaker  # noqa: E402
from tuneq.settings import Settings  # noqa: E402


def counters(monitor: Engine) -> Callable[[], dict[str, float]]:
    """CPU seconds of this database's backends and the server's WAL writer, checkpointer
    and background writer (/proc/<pid>/stat), this process's, and the jobs table's updates."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu_seconds(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone, or the server is on another machine
            return math.nan
        return (int(fields[11]) + int(fields[12])) / tick  # utime + stime

    def sample() -> dict[str, float]:
        with monitor.connect() as db:
            pids = db.exec_driver_sql(
                "SELECT pid, datname IS NOT NULL FROM pg_stat_activity WHERE (datname = "
                "current_database() AND pid <> pg_backend_pid()) OR backend_type IN "
                "('walwriter', 'checkpointer', 'background writer')"
            ).all()
            updates = db.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
            ).one()
        backends = [cpu_seconds(pid) for pid, ours in pids if ours]
        background = [cpu_seconds(pid) for pid, ours in pids if not ours]
        return {"db_backends": sum(backends), "db_background": sum(background),
                "bench": time.process_time(), "updates": updates[0], "hot": updates[1]}  # fmt: skip

    return sample


def pct(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile q of values (None when there are none)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def figures(tally: Tally, *, workers: int, connections: int, phase: str,
            interval: float | None) -> dict[str, Any]:  # fmt: skip
    window, cpu = tally.window_s, tally.cpu
    r = lambda v, n=1: None if v is None or math.isnan(v) else round(v, n)  # noqa: E731
    return {
        "workers": workers, "connections": connections, "phase": phase, "interval_s": interval,
        "window_s": r(window, 2), "start_s": r(tally.start_s, 2),
        "claims": len(tally.claim_ms) - tally.empty,
        "claims_per_s": r((len(tally.claim_ms) - tally.empty) / window),
        "claim_p50_ms": r(pct(tally.claim_ms, 0.5)), "claim_p99_ms": r(pct(tally.claim_ms, 0.99)),
        "empty_claims": tally.empty, "beats": len(tally.beat_ms),
        "beats_per_s": r(len(tally.beat_ms) / window),
        "beat_p50_ms": r(pct(tally.beat_ms, 0.5)), "beat_p99_ms": r(pct(tally.beat_ms, 0.99)),
        "beat_max_ms": r(max(tally.beat_ms, default=None)),
        "errors": tally.errors, "lost_leases": tally.lost,
        "db_cpu": r(cpu.get("db_backends", math.nan) + cpu.get("db_background", 0.0), 2),
        "db_backends_cpu": r(cpu.get("db_backends"), 2),
        "bench_cpu": r(cpu.get("bench"), 2),
        "hot_update_share": r(cpu["hot"] / cpu["updates"], 2) if cpu.get("updates") else None,
        "beat_updates": tally.beat_updates, "hot_beat_updates": tally.hot,
        "hot_beat_share": r(tally.hot / tally.beat_updates, 2) if tally.beat_updates else None,
    }  # fmt: skip


HEADER = (
    "| workers | conns | phase | claims/s | claim ms p50 / p99 | empty | beats/s "
    "| beat ms p50 / p99 | HOT | start s | DB CPU | bench CPU |\n"
    "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row(f: dict[str, Any]) -> str:
    show = lambda v, fmt="{}": "—" if v is None else fmt.format(v)  # noqa: E731
    cells = [
        f"{f['workers']:,}", str(f["connections"]), f["phase"], show(f["claims_per_s"]),
        f"{show(f['claim_p50_ms'])} / {show(f['claim_p99_ms'])}", str(f["empty_claims"]),
        show(f["beats_per_s"]) if f["interval_s"] else "—",
        f"{show(f['beat_p50_ms'])} / {show(f['beat_p99_ms'])}" if f["interval_s"] else "—",
        show(f["hot_beat_share"], "{:.0%}"),
        show(f["start_s"]), show(f["db_cpu"], "{:.2f}"), show(f["bench_cpu"], "{:.2f}"),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def phases(args: argparse.Namespace, lease: float) -> list[tuple[int, float | None]]:
    """(workers, heartbeat interval) for each phase; None: the claims phase."""
    plan: list[tuple[int, float | None]] = []
    for n in args.workers:
        plan.append((n, None))
        intervals = args.intervals if n == max(args.workers) else [lease / 3]
        plan += [(n, interval) for interval in sorted(intervals, reverse=True)]
    return plan


def hot_updates(monitor: Engine, timeout: float = 15.0) -> int:
    """The jobs table's HOT updates so far, once every other backend of this database has
    exited (and so reported its counters), or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with monitor.connect() as db:
        others = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        while db.exec_driver_sql(others + "AND pid <> pg_backend_pid()").scalar():
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        db.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return db.exec_driver_sql(
            "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
        ).scalar_one()


def server_limits(monitor: Engine) -> dict[str, int]:
    with monitor.connect() as db:
        row = db.exec_driver_sql(
            "SELECT current_setting('max_connections')::int, current_setting("
            "'superuser_reserved_connections')::int, (SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())"
        ).one()
    return dict(zip(("max_connections", "reserved", "in_use"), row, strict=True))


def measure(args: argparse.Namespace, url: str, home: Path) -> dict[str, Any]:
    from tuneq.migrate import upgrade

    upgrade(url)
    monitor = create_engine(url, poolclass=NullPool)
    limits = server_limits(monitor)
    free = limits["max_connections"] - limits["reserved"] - limits["in_use"] - 10  # others'
    base = Settings(home=home, database_url=url)
    lease = base.lease_ttl_seconds
    setup = make_sessionmaker(make_engine(url))
    teams = add_teams(setup, args.teams)
    broker = deque(top_up(setup, teams, args.backlog))
    with monitor.connect() as db:  # the planner's statistics, as autovacuum would gather them
        db.exec_driver_sql("ANALYZE jobs, outbox, teams")
        db.commit()  # (rolled back, ANALYZE's statistics are lost)
    rows = []
    for workers, interval in phases(args, lease):
        connections = min(workers, args.connections, free)
        broker.extend(top_up(setup, teams, args.backlog))
        setup.kw["bind"].dispose()  # (its connections reopen at the next top-up)
        settings = base.model_copy(update={"lease_ttl_seconds": 3 * (interval or lease / 3)})
        hot_before = hot_updates(monitor)
        groups = open_groups(url, connections)
        try:
            simulation = Simulation(groups, settings, broker, steady=interval is not None,
                                    job_seconds=args.job_seconds, seed=args.seed)  # fmt: skip
            tally = simulation.run(workers, args.seconds, counters(monitor))
        finally:
            close_groups(groups)
        tally.hot = hot_updates(monitor) - hot_before
        phase = "claims" if interval is None else f"steady @{interval:g}s"
        rows.append(figures(tally, workers=workers, connections=connections, phase=phase,
                            interval=interval))  # fmt: skip
        print(row(rows[-1]), flush=True)
    setup.kw["bind"].dispose()
    monitor.dispose()
    return {"limits": limits, "lease_s": lease, "rows": rows}


def main() -> None:
    from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url

    numbers = lambda text: [float(x) for x in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",")],
                        default=[10, 100, 1000], help="N, comma-separated")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0, help="each phase's window")
    parser.add_argument("--intervals", type=numbers, default=[30.0, 10.0, 5.0, 2.0],
                        help="heartbeat intervals (s) tried at the largest N")  # fmt: skip
    parser.add_argument("--connections", type=int, default=50, help="at most, for all N workers")
    parser.add_argument("--backlog", type=int, default=5000, help="queued jobs at each start")
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--job-seconds", type=float, default=120.0, help="mean job, steady")
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()

    url = fresh_postgres_database(postgres_url())
    try:
        with tempfile.TemporaryDirectory(prefix="tuneq-lease-scale-") as home:
            print(HEADER, flush=True)
            report = measure(args, url, Path(home))
    finally:
        drop_postgres_database(url)
    limits = report["limits"]
    print(f"\nPostgreSQL max_connections {limits['max_connections']} "
          f"({limits['reserved']} reserved, {limits['in_use']} in use by others at the start); "
          f"lease {report['lease_s']:g} s by default; {os.cpu_count()} CPUs, PostgreSQL and "
          "the simulated workers on the same machine")  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
