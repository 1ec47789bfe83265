"""Fault injection for the fault tests and `bench/faults.py`, armed only by TUNEQ_FAULTS.

A deployment never sets it; with it unset every hook here is a no-op. The faults that
the real world provides on loopback without help (killed processes, a broker restarted,
connections reset by a proxy) are made that way; these hooks make the rest:

- `{"exit_after_commit": true}`: `POST /jobs` kills its API process right after the job's
  commit, before it publishes the job (the relay must);
- `{"relay_twice": true}`: the outbox relay publishes every message twice;
- `{"clock_skew_seconds": S}`: this process's clock (`tuneq.db.utcnow`) runs S seconds off;
- a job whose `metadata` has `"fault"` (only while TUNEQ_FAULTS is set, to anything):
  `"exit"` kills the worker process at step `fault_step` (default 2), `"raise"` raises an
  unexpected exception there, `"disk_full"` fails the first checkpoint write with ENOSPC;
  `"fault_attempts"` (attempt numbers, comma-separated: "1,2") limits it to those attempts
  (default all). Metadata values are strings: `"fault_step": "3"`.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

_armed: dict[str, Any] | None = None

JOB_FAULTS = ("exit", "raise", "disk_full")


def arm(faults: dict[str, Any] | None) -> None:
    """Arm this process's hooks from Settings.faults (None: disarm)."""
    global _armed
    _armed = dict(faults) if faults is not None else None
    from tuneq import db  # the clock lives there

    db.set_clock_skew(float((_armed or {}).get("clock_skew_seconds", 0.0)))


def armed(name: str) -> Any:
    return None if _armed is None else _armed.get(name)


def exit_point(name: str) -> None:
    """Die here, as a killed process does (no cleanup, no response), when `name` is armed."""
    if armed(name):
        os._exit(70)


@dataclass(frozen=True)
class JobFault:
    kind: str
    step: int

    def at_step(self, step: int) -> None:
        """The engine finished `step`: die or raise when it is this fault's step."""
        if step != self.step:
            return
        if self.kind == "exit":
            os._exit(70)
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step}")

    def at_checkpoint(self) -> None:
        if self.kind == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")


def job_fault(metadata: dict[str, str] | None, attempt: int) -> JobFault | None:
    """The fault a job's metadata asks for on this attempt; None unless TUNEQ_FAULTS is set."""
    if _armed is None or not metadata or metadata.get("fault") not in JOB_FAULTS:
        return None
    attempts = metadata.get("fault_attempts")
    if attempts is not None and attempt not in {int(a) for a in attempts.split(",") if a}:
        return None
    return JobFault(str(metadata["fault"]), int(metadata.get("fault_step", 2)))
