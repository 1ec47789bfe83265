"""A model's throughput on this deployment: recorded by the worker from a job that succeeded,
read by the next dry run; on SQLite and on PostgreSQL, with the real worker's code path
(JobRunner in this process, a tiny Llama, the job submitted through the API).

Before any job of a model finished, the estimate uses the TUNEQ_ESTIMATED_* settings and
says so; a failure to record never fails the job.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select, text

from tests.api_helpers import TRAIN_ROWS, deployment, job_spec, upload
from tests.conftest import chat
from tests.service_fixtures import api_client, auth, new_team_key
from tuneq.db import transaction
from tuneq.jobs.models import Job
from tuneq.settings import Settings
from tuneq.throughput.models import ModelThroughput
from tuneq.throughput.service import (
    JobFigures,
    device_kind,
    record_job_figures,
    throughput_for,
)
from worker.runner import JobRunner

VALIDATION_ROWS = [
    chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40, 44)
]
TIMINGS = {
    "load_seconds": 3.0,
    "train_seconds": 10.0,
    "eval_seconds": 2.0,
    "checkpoint_seconds": 1.0,
    "wall_seconds": 16.0,
    "train_tokens": 1000,
    "eval_tokens": 1200,
    "evaluations": 3,
    "checkpoints": 4,
}


@dataclass
class Env:
    settings: Settings
    client: TestClient
    key: str
    training_file: str
    validation_file: str

    @property
    def sessions(self) -> Any:
        return self.client.app.state.sessions

    def spec(self, model: str = "tiny-llama") -> dict[str, Any]:
        spec = job_spec(self.training_file, model=model, validation_file=self.validation_file)
        spec["hyperparameters"] |= {"eval_every_steps": 2, "checkpoint_every_steps": 2}
        return spec

    def dry_run(self) -> dict[str, Any]:
        response = self.client.post("/jobs?dry_run=true", headers=auth(self.key), json=self.spec())
        assert response.status_code == 200, response.text
        return response.json()["estimate"]

    def submit(self) -> str:
        created = self.client.post("/jobs", headers=auth(self.key), json=self.spec())
        assert created.status_code == 201, created.text
        return created.json()["id"]

    def run(self, job_id: str) -> Job:
        """Run the job to its end here, as a worker's task would. The claim runs the job
        due on the queue (fair share), so the other jobs a test left queued go first."""
        for job in self.client.get("/jobs", headers=auth(self.key)).json()["data"]:
            if job["status"] == "queued" and job["id"] != job_id:
                self.client.post(f"/jobs/{job['id']}/cancel", headers=auth(self.key))
        state = self.client.app.state
        JobRunner(self.settings, state.sessions, state.store, state.registry).run(job_id)
        with self.sessions() as db:
            job = db.get(Job, job_id)
            assert job is not None
            return job

    def rows(self) -> list[ModelThroughput]:
        with self.sessions() as db:
            return list(db.scalars(select(ModelThroughput).order_by(ModelThroughput.id)))

    def clear(self) -> None:
        with transaction(self.sessions) as db:
            db.execute(delete(ModelThroughput))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory, tiny_registry_file) -> Iterator[Env]:
    home = tmp_path_factory.mktemp(f"throughput-{request.param}")
    overrides = {"estimated_load_seconds": 4.0, "estimated_checkpoint_seconds": 0.5}
    with deployment(request.param, home, tiny_registry_file) as plain:
        settings = plain.model_copy(update=overrides)
        key = new_team_key(settings, "team-throughput")
        with api_client(settings) as client:
            yield Env(
                settings,
                client,
                key,
                upload(client, key, TRAIN_ROWS),
                upload(client, key, VALIDATION_ROWS, "v.jsonl"),
            )


def _phases_add_up(estimate: dict[str, Any]) -> bool:
    phases = estimate["seconds_by_phase"]
    return list(phases) == ["load", "train", "eval", "checkpoint"] and estimate[
        "estimated_seconds"
    ] == pytest.approx(sum(phases.values()), abs=0.3)


def test_a_succeeded_job_records_its_speed_and_the_next_dry_run_uses_it(env: Env) -> None:
    env.clear()
    before = env.dry_run()
    assert before["basis"].startswith("default:") and "tiny-llama" in before["basis"]
    assert before["seconds_by_phase"]["load"] == 4.0  # the settings' figures
    assert before["seconds_by_phase"]["checkpoint"] == 0.5 * before["checkpoints"]
    assert _phases_add_up(before)

    job = env.run(env.submit())

    assert job.state == "succeeded", job.error
    [row] = env.rows()
    assert (row.model, row.task, row.method, row.device, row.jobs) == (
        "tiny-llama",
        "causal_lm",
        "lora",
        "cpu",
        1,
    )
    assert job.result is not None
    expected = JobFigures.from_result(job.result)
    assert expected is not None
    assert row.train_tokens_per_second == pytest.approx(expected.train_tokens_per_second)
    after = env.dry_run()
    assert after["basis"] == "measured: 1 causal_lm lora job of tiny-llama on cpu"
    assert after["seconds_by_phase"]["train"] == pytest.approx(
        after["trained_tokens"] / row.train_tokens_per_second, abs=0.1
    )
    assert _phases_add_up(after)
    # the job's stored estimate is the dry run's, phases and basis included
    created = env.client.post("/jobs", headers=auth(env.key), json=env.spec())
    assert created.json()["estimate"] == after


def test_a_failure_to_record_does_not_fail_the_job(env: Env, caplog) -> None:
    job_id = env.submit()
    with transaction(env.sessions) as db:  # no table to record into
        db.execute(text("ALTER TABLE model_throughput RENAME TO model_throughput_away"))
    try:
        job = env.run(job_id)
    finally:
        with transaction(env.sessions) as db:
            db.execute(text("ALTER TABLE model_throughput_away RENAME TO model_throughput"))

    assert job.state == "succeeded", job.error
    assert job.result is not None and job.result["trained_tokens"] > 0
    assert f"job {job_id}: its throughput was not recorded" in caplog.messages


def _record(
    env: Env, result: dict[str, Any], model: str = "m", task: str = "causal_lm", method: str = ""
) -> None:
    figures = JobFigures.from_result(result)
    assert figures is not None
    with transaction(env.sessions) as db:
        record_job_figures(db, model=model, task=task, method=method, figures=figures)


def _throughput(env: Env, model: str = "m", task: str = "causal_lm", method: str = "") -> Any:
    with env.sessions() as db:
        return throughput_for(db, model=model, task=task, method=method, settings=env.settings)


def test_the_timings_give_every_figure_and_later_jobs_blend_in(env: Env) -> None:
    env.clear()
    _record(env, {"device": "cpu", "timings": TIMINGS})

    first = _throughput(env)
    assert first.train_tokens_per_second == 100.0  # 1000 tokens in 10 s
    assert first.eval_tokens_per_second == 600.0
    assert first.load_seconds == 3.0 and first.seconds_per_checkpoint == 0.25
    assert first.basis == "measured: 1 causal_lm job of m on cpu"

    _record(env, {"device": "cpu", "timings": TIMINGS | {"train_seconds": 5.0}})
    second = _throughput(env)
    assert second.train_tokens_per_second == pytest.approx(150.0)  # the mean of 100 and 200
    assert second.basis == "measured: 2 causal_lm jobs of m on cpu"
    for _ in range(6):  # after four jobs, each new one counts a quarter
        _record(env, {"device": "cpu", "timings": TIMINGS | {"train_seconds": 5.0}})
    assert 150.0 < _throughput(env).train_tokens_per_second < 200.0


def test_a_result_without_timings_records_its_train_speed_only(env: Env) -> None:
    env.clear()
    _record(env, {"device": "cpu", "tokens_per_second": 80.0, "trained_tokens": 800})

    figures = _throughput(env)
    assert figures.train_tokens_per_second == 80.0
    assert figures.eval_tokens_per_second == pytest.approx(240.0)  # a forward pass's share
    assert figures.load_seconds == 4.0 and figures.seconds_per_checkpoint == 0.5  # settings
    assert JobFigures.from_result({"device": "cpu"}) is None  # no speed: nothing to record
    assert JobFigures.from_result({"tokens_per_second": 80.0}) is None  # no device


def test_the_most_recent_device_and_the_task_choose_the_row(env: Env) -> None:
    env.clear()
    _record(env, {"device": "NVIDIA H200", "tokens_per_second": 5000.0})
    _record(env, {"device": "cpu", "tokens_per_second": 90.0})
    _record(env, {"device": "cpu", "tokens_per_second": 9.0}, task="seq_classification")

    assert device_kind("NVIDIA H200") == "cuda:NVIDIA H200"
    assert _throughput(env).basis == "measured: 1 causal_lm job of m on cpu"
    _record(env, {"device": "NVIDIA H200", "tokens_per_second": 5000.0})
    latest = _throughput(env)
    assert latest.train_tokens_per_second == 5000.0
    assert latest.basis == "measured: 2 causal_lm jobs of m on cuda:NVIDIA H200"
    assert _throughput(env, model="other").basis.startswith("default:")


def test_each_method_has_its_figures_and_one_without_any_borrows_anothers(env: Env) -> None:
    env.clear()
    _record(env, {"device": "cpu", "tokens_per_second": 100.0}, method="lora")

    borrowed = _throughput(env, method="full")
    assert borrowed.train_tokens_per_second == 100.0  # closer than the settings' default
    assert borrowed.basis == (
        "measured: 1 causal_lm lora job of m on cpu (no full job has finished here yet)"
    )

    _record(env, {"device": "cpu", "tokens_per_second": 30.0}, method="full")
    _record(env, {"device": "cpu", "tokens_per_second": 300.0}, method="head_only")
    assert _throughput(env, method="full").train_tokens_per_second == 30.0
    assert _throughput(env, method="lora").train_tokens_per_second == 100.0
    head_only = _throughput(env, method="head_only")
    assert head_only.basis == "measured: 1 causal_lm head_only job of m on cpu"
    assert [(row.method, row.jobs) for row in env.rows()] == [
        ("lora", 1),
        ("full", 1),
        ("head_only", 1),
    ]


def test_a_preference_jobs_speed_is_recorded_in_plain_steps_tokens() -> None:
    """A DPO step also runs the reference forward, which the estimate adds to a DPO job's
    train time: its measured speed is scaled up by that cost when recorded, so the next
    estimate (DPO or SFT) counts the reference once."""
    from peft_engine.estimate import train_token_cost
    from peft_engine.eval_plan import EVAL_COST_PER_TOKEN

    dpo = {"type": "lora", "objective": {"type": "dpo", "beta": 0.1}}
    plain = JobFigures.from_result({"device": "cpu", "timings": TIMINGS})
    preference = JobFigures.from_result(
        {"device": "cpu", "timings": TIMINGS, "spec": {"method": dpo}}
    )
    assert plain is not None and preference is not None
    assert plain.train_tokens_per_second == 100.0
    assert preference.train_tokens_per_second == pytest.approx(100.0 * (1 + EVAL_COST_PER_TOKEN))
    assert preference.eval_tokens_per_second == plain.eval_tokens_per_second  # no reference
    # the estimate's cost undoes the scaling: a DPO job's train seconds a token as measured
    assert train_token_cost("dpo") / preference.train_tokens_per_second == pytest.approx(0.01)
    assert train_token_cost("sft") == 1.0
