"""The fault runs' history checker (tests/fault_history.py) on hand-written histories."""

from __future__ import annotations

import json

import pytest

from tests.fault_history import check_history, checkpoint_steps_lost, duplicates, read_history


def record(kind, t, *, fence=1, attempt=None, expires=None, job="j1", **extra):
    attempt = fence if attempt is None else attempt
    return {"kind": kind, "job": job, "attempt": attempt, "fence": fence, "owner": "w",
            "pid": 1, "db_time": t, "expires": expires, "step": None,
            "state": None} | extra  # fmt: skip


def killed_then_resumed():
    """Attempt 1 renews until 14 then dies; attempt 2 claims after its lease ran out."""
    return [
        record("claim", 10.0, expires=13.0),
        record("renew", 11.0, expires=14.0),
        record("checkpoint", 11.5, step=5),
        record("claim", 14.5, fence=2, expires=17.5),
        record("renew", 15.5, fence=2, expires=18.5),
        record("end", 16.0, fence=2, state="succeeded"),
    ]


def test_a_clean_history_has_no_violations():
    assert check_history(killed_then_resumed(), {"j1": "succeeded"}) == []
    assert duplicates(killed_then_resumed()) == 0


def test_a_release_ends_the_lease_before_its_expiry():
    handover = [
        record("claim", 10.0, expires=13.0),
        record("release", 11.0, state="queued"),
        record("claim", 11.2, fence=2, expires=14.2),
        record("end", 12.0, fence=2, state="succeeded"),
    ]
    assert check_history(handover, {"j1": "succeeded"}) == []


def test_a_claim_while_the_lease_is_live_is_a_duplicate():
    history = killed_then_resumed()
    history[3] = record("claim", 13.5, fence=2, expires=16.5)  # before 14.0, the last expiry
    violations = check_history(history, {"j1": "succeeded"})
    assert len(violations) == 1 and "held its lease until 14.000" in violations[0]
    assert duplicates(history) == 1


def test_a_write_under_an_old_fence_is_caught():
    history = [*killed_then_resumed(), record("checkpoint", 15.0, fence=1, step=10)]
    violations = check_history(history, {"j1": "succeeded"})
    assert violations == [
        "job j1: checkpoint of attempt 1 at 15.000 under fence 1, the current fence being 2"
    ]
    assert duplicates(history) == 0  # the lease itself did not overlap


def test_a_write_with_no_claim_is_caught():
    violations = check_history([record("renew", 1.0, expires=4.0)], {})
    assert violations == [
        "job j1: renew of attempt 1 at 1.000 under fence 1, the current fence being None"
    ]


def test_fences_must_increase_claim_after_claim():
    history = [
        record("claim", 10.0, fence=2, expires=11.0),
        record("claim", 12.0, fence=2, attempt=3, expires=15.0),
    ]
    violations = check_history(history, {"j1": "succeeded"})
    assert any("took fence 2, not above the earlier claim's 2" in v for v in violations)


def test_every_accepted_job_must_end():
    violations = check_history(killed_then_resumed(), {"j1": "succeeded", "j2": "running"})
    assert violations == ["job j2: ended 'running', not a terminal state"]


def test_jobs_are_checked_apart():
    other = [record("claim", 13.6, job="j2", expires=16.6)]  # j1's lease is live: no matter
    assert check_history(killed_then_resumed() + other, {"j1": "failed", "j2": "cancelled"}) == []


def test_the_log_is_read_line_by_line_and_a_torn_last_line_left_out(tmp_path):
    path = tmp_path / "history.jsonl"
    lines = [json.dumps(r) for r in killed_then_resumed()]
    path.write_text("\n".join(lines) + '\n{"kind": "ren')
    assert read_history(path) == killed_then_resumed()
    assert read_history(tmp_path / "absent.jsonl") == []
    path.write_text('{"kind": \n' + "\n".join(lines))
    with pytest.raises(json.JSONDecodeError):
        read_history(path)


def test_checkpoint_steps_lost():
    one_attempt = [(1, s) for s in range(1, 21)]
    assert checkpoint_steps_lost(one_attempt, ["job succeeded"]) == 0

    killed_at_7 = [(1, s) for s in range(1, 8)] + [(2, s) for s in range(6, 21)]
    resumed = ["attempt 2 started on w", "resuming from the checkpoint of step 5 (attempt 2)"]
    assert checkpoint_steps_lost(killed_at_7, resumed) == 2

    no_checkpoint = [(1, 1), (1, 2), (1, 3)] + [(2, s) for s in range(1, 21)]
    assert checkpoint_steps_lost(no_checkpoint, []) == 3  # attempt 2 started from scratch

    twice = [(1, 7), (2, 9), (3, 20)]
    events = [
        "resuming from the checkpoint of step 5 (attempt 2)",
        "resuming from the checkpoint of step 8 (attempt 3)",
    ]
    assert checkpoint_steps_lost(twice, events) == (7 - 5) + (9 - 8)
