"""Fault injection (issue 17): each fault of tests/fault_scenarios.py, many times.

    .venv/bin/python bench/faults.py                      # every fault 5 times (fault 1: 10)
    .venv/bin/python bench/faults.py --runs 1 --faults 1,5,13

One deployment is started here (tests/fault_stack.py): a fresh database on the
machine's PostgreSQL or a throwaway one (found or started as the tests do,
tests/infra.py), its own `redis-server` on a free port, S3 over HTTP (moto's server)
behind a TCP proxy that can reset connections, `tuneq beat` and `tuneq worker` processes
(each worker reaching the database through a proxy of its own), the API in this process,
and a tiny random Llama so that a job trains in seconds. The faults, in the order that
lets each reuse the workers the one before left up:

 1 SIGKILL the worker at a random step       8 the relay publishes every message twice
 2 a job longer than Redis' visibility timeout 9 the object store down during uploads
 3 a poison job (kills its worker each time) 10 SIGTERM to the busy workers (a deploy)
 4 Redis restarted, then flushed (FLUSHALL)  11 cancel: queued, running, worker cut off
 5 the busy worker cut off from the database 12 max_runtime_seconds reached
 6 the database gone for a second (< lease)  13 two reapers, worker clocks ±5 minutes
 7 the API killed between commit and publish 14 disk full at a checkpoint

Each run's expectation is in its function's docstring. Columns:

- `runs`: runs of the fault (fault 1, the random one, runs twice as often);
- `ended as expected`: runs whose jobs all ended as the expectation says, with a clean
  history (the checker of tests/fault_history.py: at most one live lease per job, no
  write under an old fence, fences increasing, every job ended);
- `lost`: jobs that never reached succeeded, failed or cancelled (waited for 3 minutes);
- `duplicates`: claims made while another attempt's lease was still live (the checker);
- `checkpoint steps lost`: the most, in one run, of the steps trained again because a
  later attempt started behind where an earlier one had got (≤ the checkpoint interval,
  10 here, where a worker is killed; 0 for a handover);
- `time to recover`: the median over the runs of the seconds from the fault until every
  job it hit trained again (a step of a new attempt where the fault ends an attempt: 1,
  5, 10, 13, 14) or ended; for 3 and 11, until the jobs ended; for 7 and 8, from the
  submission to the first step; for 9, from the upload that met the outage; none for 12.

Nothing here is asserted; tests/test_faults.py runs each fault once and asserts. The last
line is one JSON object: `faults`, `runs`, `lost`, `duplicates`, `unexpected` (sums) and
one row a fault, with the notes of the runs that went otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fault_*: the deployment and the scenarios the tests use

HEADER = (
    "| fault | runs | ended as expected | lost | duplicates | checkpoint steps lost "
    "| time to recover (median s) |\n|---|---:|---:|---:|---:|---:|---:|"
)


def run_fault(stack: Any, fault: int, runs: int, rng: random.Random) -> dict[str, Any]:
    """`runs` runs of one fault; a scenario that raises counts as a run not as expected."""
    from tests.fault_runs import FaultRun
    from tests.fault_scenarios import SCENARIOS

    name, scenario = SCENARIOS[fault]
    results = []
    for n in range(runs):
        try:
            result = scenario(stack, rng)
        except Exception as exc:  # noqa: BLE001 - reported in the table, the next run goes on
            traceback.print_exc()
            result = FaultRun(fault, False, 0, 0, 0, None, [f"raised {type(exc).__name__}: {exc}"])
        verdict = "as expected" if result.expected else f"NOT as expected: {result.notes}"
        print(f"fault {fault} ({name}) run {n + 1}/{runs}: {verdict}", flush=True)
        results.append(result)
    recovered = [r.recover_s for r in results if r.recover_s is not None]
    return {
        "fault": fault,
        "name": name,
        "runs": runs,
        "expected": sum(r.expected for r in results),
        "lost": sum(r.lost for r in results),
        "duplicates": sum(r.duplicates for r in results),
        "steps_lost_max": max(r.steps_lost for r in results),
        "recover_median_s": round(statistics.median(recovered), 2) if recovered else None,
        "notes": sorted({note for r in results for note in r.notes}),
    }


def row(figures: dict[str, Any]) -> str:
    recover = figures["recover_median_s"]
    cells = [
        f"{figures['fault']} {figures['name']}",
        str(figures["runs"]),
        f"{figures['expected']}/{figures['runs']}",
        str(figures["lost"]),
        str(figures["duplicates"]),
        str(figures["steps_lost_max"]),
        "—" if recover is None else f"{recover:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    from tests.fault_scenarios import RUN_ORDER
    from tests.fault_stack import fault_stack, tiny_registry

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each fault (fault 1: twice)")
    parser.add_argument("--faults", default=",".join(map(str, sorted(RUN_ORDER))))
    parser.add_argument("--seed", type=int, default=17, help="for the random kill step")
    args = parser.parse_args()
    wanted = {int(f) for f in args.faults.split(",")}
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log

    work = Path(tempfile.mkdtemp(prefix="tuneq-faults-"))
    rng = random.Random(args.seed)
    rows = []
    with fault_stack(work / "stack", tiny_registry(work)) as stack:
        for fault in (f for f in RUN_ORDER if f in wanted):
            runs = args.runs * (2 if fault == 1 else 1)
            rows.append(run_fault(stack, fault, runs, rng))
    rows.sort(key=lambda r: r["fault"])

    unexpected = sum(r["runs"] - r["expected"] for r in rows)
    print("\nfault injection on a tiny model; a lease of 3 s (6 s in fault 6), reaper 0.5 s")
    print(HEADER)
    for figures in rows:
        print(row(figures))
    if unexpected:
        print(f"\n{unexpected} run(s) not as expected; logs kept in {work / 'stack'}")
        for figures in rows:
            for note in figures["notes"]:
                print(f"  fault {figures['fault']}: {note}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "faults": len(rows),
        "runs": sum(r["runs"] for r in rows),
        "lost": sum(r["lost"] for r in rows),
        "duplicates": sum(r["duplicates"] for r in rows),
        "unexpected": unexpected,
        "rows": rows,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
