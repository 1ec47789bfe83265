"""A job on two ranks through the service: `resources: {"gpus": 2}` on the production stack.

A real `tuneq worker` runs the engine under torchrun with two gloo ranks on the CPU
(worker/distributed.py). Held here: the job's metrics and checkpoints reach the database and
the store as from one process; rank 1 killed mid-run fails the attempt, the job is handed
back and its next attempt resumes from the last uploaded checkpoint and succeeds; a cancel
stops both ranks and leaves none running.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat
from tests.service_fixtures import auth
from tests.stack import all_events, job_ended, running_stack, wait_for
from tests.test_distributed import _rank_pids

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]


def _attempt_dir(stack, job_id: str, attempt: int) -> Path:
    return stack.settings.resolved_work_dir / "jobs" / job_id / f"attempt-{attempt}"


def _checkpoint_steps(api, key: str, job_id: str) -> list[int]:
    page = api.get(f"/jobs/{job_id}/checkpoints", headers=auth(key)).json()["data"]
    return sorted(c["step"] for c in page)


@pytest.mark.e2e
def test_a_two_rank_job_survives_a_killed_rank_and_stops_on_cancel(tmp_path, tiny_registry_file):
    overrides = {"model_registry": str(tiny_registry_file), "relay_interval_seconds": 1.0,
                 "handback_delay_seconds": 0.0}  # fmt: skip
    with running_stack("production", tmp_path / "stack", overrides) as stack:
        key = stack.team_key("ranks")
        stack.start("worker", "worker", env={"OMP_NUM_THREADS": "1"})
        wait_for(lambda: "ready" in stack.log("worker"), timeout=120, what="the worker")
        with stack.client() as api:
            training = api.post(
                "/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(ROWS))}
            )
            assert training.status_code == 201, training.text

            def submit(epochs: int) -> str:
                spec = job_spec(training.json()["id"], validation_split=0.0,
                                resources={"gpus": 2})  # fmt: skip
                spec["method"]["dropout"] = 0.0
                spec["hyperparameters"] |= {"n_epochs": epochs, "checkpoint_every_steps": 5}
                created = api.post("/jobs", headers=auth(key), json=spec)
                assert created.status_code == 201, created.text
                assert created.json()["resources"] == {"gpus": 2}
                return created.json()["id"]

            # 1. rank 1 killed once the first checkpoint is in the store
            job_id = submit(epochs=12)  # 120 steps
            wait_for(lambda: _checkpoint_steps(api, key, job_id), timeout=180, what="a checkpoint")
            first_dir = _attempt_dir(stack, job_id, 1)
            pids = wait_for(lambda: _rank_pids(first_dir, 1), timeout=30, what="rank 1")
            os.kill(pids[0], signal.SIGKILL)
            ended = job_ended(api, key, job_id, timeout=300)
            assert ended["status"] == "succeeded", (ended, stack.log("worker")[-3000:])
            assert ended["attempt"] == 2
            messages = [e["message"] for e in all_events(api, key, job_id)]
            resumed = [m for m in messages if m.startswith("resuming from the checkpoint of step")]
            assert len(resumed) == 1, messages
            assert any("the ranks failed (torchrun exit status" in m for m in messages), messages
            metrics = api.get(f"/jobs/{job_id}/metrics", headers=auth(key)).json()
            assert [p["step"] for p in metrics["train"]] == list(range(1, 121))

            # 2. a cancel stops both ranks of a running job
            job_id = submit(epochs=40)  # 400 steps: still running when the cancel lands
            wait_for(lambda: _checkpoint_steps(api, key, job_id), timeout=180, what="a checkpoint")
            running_dir = _attempt_dir(stack, job_id, 1)
            assert _rank_pids(running_dir, 0) and _rank_pids(running_dir, 1)
            cancelled = api.post(f"/jobs/{job_id}/cancel", headers=auth(key))
            assert cancelled.status_code == 200, cancelled.text
            wait_for(
                lambda: (
                    api.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "cancelled"
                ),
                timeout=60,
                what="the cancel",
            )
            wait_for(
                lambda: not _rank_pids(running_dir, 0) and not _rank_pids(running_dir, 1),
                timeout=60,
                what="both ranks to exit",
            )
