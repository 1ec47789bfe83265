"""What one fault run yields, and how it is measured (tests/fault_scenarios.py uses these).

A `FaultRun` is one scenario's outcome: whether every job ended as the fault's
expectation says, how many jobs were lost (never ended), how many times a job was claimed
while another attempt's lease was live (the history checker's invariant (a)), how many
trained steps had to be trained again, and how long the service took to recover.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.api_helpers import job_spec
from tests.conftest import chat
from tests.fault_history import check_history, checkpoint_steps_lost, duplicates
from tests.fault_stack import TERMINAL, FaultStack

# 40 examples in batches of 4: ten steps an epoch, a few hundredths of a second a step;
# in batches of 1 for the jobs longer than the 100 epochs a job may have.
ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]


@dataclass
class FaultRun:
    fault: int
    expected: bool  # every job ended as the fault's expectation says, the history clean
    lost: int  # jobs that never reached succeeded, failed or cancelled
    duplicates: int  # claims made while another attempt's lease was live
    steps_lost: int  # steps trained again after the fault
    recover_s: float | None  # from the fault to every job it hit training again or ended
    notes: list[str] = field(default_factory=list)  # what differed from the expectation

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def spec(fs: FaultStack, steps: int, *, checkpoint_every: int = 1000, **changes: Any) -> Any:
    """A job of `steps` steps of the tiny model (a multiple of ten, of forty above 1000),
    no evaluation."""
    if not fs.training_file:
        fs.training_file = fs.upload(ROWS)
    body = job_spec(fs.training_file, validation_split=0.0, **changes)
    batch_size = 4 if steps <= 1000 else 1
    body["hyperparameters"] |= {
        "batch_size": batch_size,
        "n_epochs": max(1, steps * batch_size // len(ROWS)),
        "checkpoint_every_steps": checkpoint_every,
        "eval_every_steps": 1000,
    }
    return body


class RecoveryClock:
    """Seconds from a fault until each job it hit recovered, watched from a thread.

    Started at the fault (or at `since`, a time.monotonic()). What counts as recovered,
    besides the job ending: `"step"`, a training step written after the start; `"attempt"`,
    a step of a later attempt than the job's at the start (the old attempt may write a
    step or two before it stops); `"end"`, only the job's end."""

    def __init__(
        self,
        fs: FaultStack,
        job_ids: Iterable[str],
        *,
        since: float | None = None,
        until: str = "step",
    ) -> None:
        self.fs = fs
        self.until = until
        self.start = time.monotonic() if since is None else since
        self.marks = {job_id: self._newest(job_id) for job_id in job_ids}
        self.recovered: dict[str, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def seconds(self) -> float | None:
        """The slowest job's recovery; None when one has not recovered."""
        self._done.set()
        self._thread.join()
        if len(self.recovered) < len(self.marks):
            return None
        return round(max(self.recovered.values(), default=0.0), 2)

    def _newest(self, job_id: str) -> tuple[int, int, str]:
        """The job's newest training-metric row, its attempt then, and its state."""
        row = self.fs.sql(
            "SELECT (SELECT coalesce(max(id), 0) FROM job_metrics WHERE job_id = :job "
            "AND kind = 'train'), attempt, state FROM jobs WHERE id = :job",
            job=job_id,
        )[0]
        return int(row[0]), int(row[1]), str(row[2])

    def _recovered(self, job_id: str) -> bool:
        row, attempt, _ = self.marks[job_id]
        if self.until == "attempt":
            later = "SELECT count(*) FROM job_metrics WHERE job_id = :job AND attempt > :a"
            if self.fs.sql(later, job=job_id, a=attempt)[0][0]:
                return True
        newest, _, state = self._newest(job_id)
        return state in TERMINAL or (self.until == "step" and newest > row)

    def _watch(self) -> None:
        while not self._done.wait(0.05):
            for job_id in self.marks.keys() - self.recovered.keys():
                if self._recovered(job_id):
                    self.recovered[job_id] = time.monotonic() - self.start
            if len(self.recovered) == len(self.marks):
                return


def conclude(
    fs: FaultStack,
    fault: int,
    jobs: dict[str, dict[str, Any]],
    checks: dict[str, bool],
    recover_s: float | None,
    *,
    steps_lost_at_most: int | None = None,
) -> FaultRun:
    """The run's figures from the jobs as they ended, their history and their rows;
    `checks` name what the fault's expectation says, each True when it held."""
    records = fs.history(set(jobs))
    final = {job_id: job["status"] for job_id, job in jobs.items()}
    steps_lost = sum(
        checkpoint_steps_lost(fs.train_steps(j), [e["message"] for e in fs.events(j)]) for j in jobs
    )
    if steps_lost_at_most is not None:
        checks = checks | {
            f"at most {steps_lost_at_most} steps lost": steps_lost <= steps_lost_at_most
        }
    notes = [f"expected {name}" for name, held in checks.items() if not held]
    notes += check_history(records, final)
    lost = sum(status not in TERMINAL for status in final.values())
    return FaultRun(fault, not notes, lost, duplicates(records), steps_lost, recover_s, notes)


def messages(fs: FaultStack, job_id: str) -> list[str]:
    return [e["message"] for e in fs.events(job_id)]


def count_events(fs: FaultStack, job_id: str, code: str) -> int:
    """The job's events whose data.code is `code`, counted by the database."""
    query = "SELECT count(*) FROM job_events WHERE job_id = :job AND data->>'code' = :code"
    return int(fs.sql(query, job=job_id, code=code)[0][0])
