"""How an attempt ends: succeeded, stopped (cancel, pause, shutdown), failed, or crashed.

Each end is one fenced write: an attempt that lost its lease changes nothing. A crash is
classed by its cause (DESIGN §3):

- the user's fault (bad data found late, a loss that diverged): failed at once, with the
  engine's code (`invalid_training_file`, `training_diverged`, ...);
- out of memory: failed at once, `out_of_memory`;
- a transient store or database fault that outlasted its retries: handed back, to resume
  from its last checkpoint; on the last attempt `infrastructure_unavailable`;
- the work directory's disk full: handed back; on the last attempt `disk_full`;
- anything else (a bug, ours or a library's): handed back; on the last attempt
  `internal_error`.

A job handed back is published again after `TUNEQ_HANDBACK_DELAY_SECONDS`, doubled each
attempt (at most 10 minutes): never a storm. On its last attempt (`max_attempts`) it
fails with the code of the table instead. A worker process that dies (SIGKILL, a
segfault) is the reaper's: the same delays, `worker_lost` after the last attempt.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from peft_engine.diagnostics import DIAGNOSTICS_FILE
from tuneq.db import db_now
from tuneq.jobs.lease import fenced_update, hand_back
from tuneq.jobs.models import Job, OutboxMessage
from tuneq.jobs.schemas import ADAPTER_ARTIFACT, DIAGNOSTICS_ARTIFACT
from tuneq.jobs.states import JobState
from tuneq.throughput.service import record_result
from tuneq.webhooks.schemas import JOB_CANCELLED, JOB_FAILED, JOB_SUCCEEDED
from tuneq.webhooks.service import enqueue_job_event
from worker.artifacts import size_and_digest
from worker.journal import LeaseLapsed
from worker.retry import is_transient

if TYPE_CHECKING:
    from worker.runner import _Attempt

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def crash_class(err: BaseException) -> tuple[str, bool]:
    """(the code a job fails with for `err`, whether the job is handed back first)."""
    if is_transient(err):
        return "infrastructure_unavailable", True
    if isinstance(err, OSError) and err.errno in _DISK_FULL:
        return "disk_full", True
    if _out_of_memory(err):
        return "out_of_memory", False
    return "internal_error", True


def _out_of_memory(err: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, and the CPU allocator's RuntimeError, by name and text:
    # torch is not imported here
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def crashed(attempt: _Attempt, err: Exception) -> str:
    """The attempt ended on an exception: hand the job back or fail it (the table above)."""
    claim = attempt.claim
    if isinstance(err, LeaseLapsed) or attempt.heartbeat.lost.is_set():
        log.warning("job %s attempt %s: lease lost (%s)", claim.job_id, claim.attempt, err)
        return "lease lost"
    log.exception("job %s attempt %s crashed", claim.job_id, claim.attempt)
    cause = f"{type(err).__name__}: {err}"
    code, handed_back = crash_class(err)
    if not handed_back:
        return fail(attempt, code, _advice(code, cause), _PARAM.get(code))
    tries = getattr(err, "tries", None)
    told = {
        "infrastructure_unavailable": f"a transient fault outlasted its "
        f"{f'{tries} tries' if tries else 'retries'} ({cause})",
        "disk_full": f"the worker's disk is full ({cause})",
    }.get(code, f"the attempt crashed ({cause})")
    delay = attempt.runner.settings.handback_delay_seconds

    def back(db: Session) -> JobState | None:
        moved = hand_back(db, claim, cause=told, first_delay=delay, code=code)
        if moved is not None:
            kind = "end" if moved == JobState.FAILED else "release"
            attempt.history.note(db, kind, claim, state=moved.value)
        return moved

    try:
        moved = attempt.journal.write("hand the job back", back)
    except LeaseLapsed:
        return "lease lost"
    return f"handed back ({moved}): {cause}" if moved == JobState.QUEUED else f"{moved}: {cause}"


_PARAM = {"out_of_memory": "hyperparameters.batch_size"}


def _advice(code: str, cause: str) -> str:
    if code == "out_of_memory":
        return (
            f"out of memory ({cause}); a smaller hyperparameters.batch_size or "
            "max_seq_length, or a worker with more memory, fits"
        )
    return cause


def fail(attempt: _Attempt, code: str, message: str, param: str | None) -> str:
    error = {"code": code, "message": message, "param": param}

    def write(db: Session) -> None:
        if fenced_update(db, attempt.claim, state=JobState.FAILED, error=error,
                         finished_at=db_now(), lease_expires_at=None):  # fmt: skip
            db.add(attempt.event_row("error", f"job failed: {message}", {"code": code}))
            enqueue_job_event(db, job_id=attempt.claim.job_id, event_type=JOB_FAILED)
            attempt.history.note(db, "end", attempt.claim, state=JobState.FAILED.value)

    try:
        attempt.journal.write("fail the job", write)
    except LeaseLapsed:
        return "lease lost"
    return f"failed ({code}): {message}"


def succeed(attempt: _Attempt, output_dir: Path, result: dict[str, Any]) -> str:
    """Upload the adapter (and diagnostics), then record the result under the fence. Out of
    time (max_runtime_seconds): the best weights so far are kept as the adapter, and the
    job fails with a code that says why."""
    claim, store = attempt.claim, attempt.store
    prefix = f"jobs/{claim.job_id}/attempts/{claim.attempt}"
    files = tuple(p.name for p in output_dir.iterdir() if p.is_file())
    key, size, digest = attempt.upload_tarball(output_dir, f"{prefix}/{ADAPTER_ARTIFACT}", files)
    diagnostics = output_dir / DIAGNOSTICS_FILE  # also on its own, for GET .../diagnostics
    diagnostics_key = f"{prefix}/{DIAGNOSTICS_ARTIFACT}"
    if diagnostics.is_file():
        store.put_file(diagnostics_key, diagnostics)
    error = _out_of_time(result) if result.get("max_runtime_reached") else None
    state = JobState.FAILED if error else JobState.SUCCEEDED

    def record(db: Session) -> bool:
        if not fenced_update(db, claim, state=state, result=result, error=error,
                             trained_tokens=int(result.get("trained_tokens", 0)),
                             finished_at=db_now(), lease_expires_at=None):  # fmt: skip
            return False
        attempt.add_artifact(db, ADAPTER_ARTIFACT, "adapter", None, key, size, digest)
        if diagnostics.is_file():
            attempt.add_artifact(db, DIAGNOSTICS_ARTIFACT, "diagnostics", None,
                                 diagnostics_key, *size_and_digest(diagnostics))  # fmt: skip
        attempt.history.note(db, "end", claim, state=state.value)
        if error:
            data = {"code": error["code"], "artifact": ADAPTER_ARTIFACT}
            db.add(attempt.event_row("error", f"job failed: {error['message']}", data))
            enqueue_job_event(db, job_id=claim.job_id, event_type=JOB_FAILED)
            return True
        db.add(attempt.event_row("info", "job succeeded", {"artifact": ADAPTER_ARTIFACT}))
        enqueue_job_event(db, job_id=claim.job_id, event_type=JOB_SUCCEEDED)
        record_result(db, result, job_id=claim.job_id)
        return True

    try:
        recorded = attempt.journal.write("record the result", record)
    except LeaseLapsed:
        recorded = False
    if not recorded:  # another attempt owns the job: what we uploaded is nobody's
        store.delete(key)
        store.delete(diagnostics_key)
        return "lease lost before the result was recorded"
    return "failed: max_runtime_exceeded" if error else "succeeded"


def stopped(attempt: _Attempt) -> str:
    """The engine stopped before its last step: cancelled, paused, or handed to another
    worker because this one is shutting down (its attempt refunded)."""
    heartbeat = attempt.heartbeat
    heartbeat.beat()  # the latest flags: a cancel may have come since the last beat
    if heartbeat.lapsed():
        return "lease lost; stopped"
    if heartbeat.cancel_requested.is_set():
        target, message = JobState.CANCELLED, "cancelled"
        values: dict[str, Any] = {"finished_at": db_now()}
    elif heartbeat.pause_requested.is_set():
        target, message = JobState.PAUSED, "paused; resume continues from the last checkpoint"
        values = {"pause_requested": False}
    else:
        target, message = JobState.QUEUED, "worker shutting down; queued again"
        values = {"max_attempts": Job.max_attempts + 1}

    def write(db: Session) -> None:
        if not fenced_update(db, attempt.claim, state=target, lease_owner=None,
                             lease_expires_at=None, **values):  # fmt: skip
            return
        db.add(attempt.event_row("info", message))
        kind = "end" if target == JobState.CANCELLED else "release"
        attempt.history.note(db, kind, attempt.claim, state=target.value)
        if target == JobState.QUEUED:
            db.add(OutboxMessage(job_id=attempt.claim.job_id))
        elif target == JobState.CANCELLED:
            enqueue_job_event(db, job_id=attempt.claim.job_id, event_type=JOB_CANCELLED)

    try:
        attempt.journal.write("stop the job", write)
    except LeaseLapsed:
        return "lease lost; stopped"
    return message


def _out_of_time(result: dict[str, Any]) -> dict[str, Any]:
    limit = result["spec"].get("max_runtime_seconds")
    return {
        "code": "max_runtime_exceeded",
        "message": f"the job ran for its max_runtime_seconds ({limit} s) and stopped at step "
        f"{result.get('steps')} of {result.get('total_steps')}; the adapter holds its best "
        f"weights so far (step {result.get('best_step')}), its checkpoints are kept",
        "param": "max_runtime_seconds",
    }
