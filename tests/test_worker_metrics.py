"""The Prometheus metrics of `tuneq worker` and `tuneq beat` (worker/metrics.py).

The end-to-end test runs the embedded stack (beat, one real worker, the API in-process),
trains two real jobs on the tiny model, one of which crashes once on purpose (the fault
hooks of tuneq/faults.py) and is retried, and scrapes both processes' /metrics during the
jobs and after. Every scrape goes through prometheus_client's own parser: `promtool check
metrics` is not installed here. The collectors are also checked alone, on a real database.
"""

from __future__ import annotations

import socket
import urllib.request
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from peft_engine.hooks import Hooks
from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat
from tests.service_fixtures import auth, insert_job, make_settings, migrate
from tests.stack import job_ended, running_stack, wait_for
from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.jobs.models import Job
from tuneq.jobs.states import JobState
from tuneq.teams.models import Team
from worker.metrics import (
    AttemptMetrics,
    QueueCollector,
    WorkerMetrics,
    memory_by_device,
    serve_worker_metrics,
)

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition, by (name, sorted labels); the parser raises on
    anything malformed."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no help text"
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value, 0 when absent (a counter not yet touched)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- a real stack, a real job ------------------------------------------------------------


@pytest.mark.e2e
def test_a_running_worker_and_beat_report_steps_tokens_and_the_queue(tmp_path, tiny_registry_file):
    worker_port, beat_port = free_port(), free_port()
    overrides = {
        "model_registry": str(tiny_registry_file),
        "relay_interval_seconds": 1.0,
        "worker_metrics_port": worker_port,
        "beat_metrics_port": beat_port,
        "faults": {},  # arms the job hooks: the second job's metadata crashes it once
    }
    with running_stack("embedded", tmp_path / "stack", overrides) as stack:
        key = stack.team_key("metrics")
        stack.start("worker", env={"OMP_NUM_THREADS": "1"})
        wait_for(lambda: "training@" in stack.log("worker") and " ready." in stack.log("worker"),
                 timeout=120, what="the worker")  # fmt: skip
        scrapes = {"worker": [scrape(worker_port)], "beat": [scrape(beat_port)]}
        with stack.client() as api:
            uploaded = api.post(
                "/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(ROWS))}
            )
            assert uploaded.status_code == 201, uploaded.text

            def submit(epochs: int, **metadata: str) -> str:
                spec = job_spec(uploaded.json()["id"], validation_split=0.2, metadata=metadata)
                spec["hyperparameters"] |= {"n_epochs": epochs, "eval_every_steps": 4,
                                            "checkpoint_every_steps": 4}  # fmt: skip
                created = api.post("/jobs", headers=auth(key), json=spec)
                assert created.status_code == 201, created.text
                return created.json()["id"]

            first = submit(4)

            def training() -> Samples | None:  # the worker's metrics while the job trains
                scrapes["worker"].append(now := scrape(worker_port))
                running = value(now, "tuneq_worker_jobs_running", queue="training")
                steps = value(now, "tuneq_worker_steps_total", queue="training")
                return now if running == 1 and steps > 0 else None

            during = wait_for(training, timeout=180, interval=0.2, what="steps while it runs")
            # the second job waits behind the first (one worker): beat sees it queued
            second = submit(1, fault="raise", fault_step="2", fault_attempts="1")

            def queued() -> Samples | None:
                scrapes["beat"].append(now := scrape(beat_port))
                depth = value(now, "tuneq_queue_jobs", queue="training", team="metrics")
                return now if depth >= 1 else None

            waiting = wait_for(queued, timeout=60, interval=0.2, what="a queued job at beat")
            jobs = {job_id: job_ended(api, key, job_id, timeout=300) for job_id in (first, second)}
        after = scrape(worker_port)
        beat_after = scrape(beat_port)
        scrapes["worker"].append(after)
        scrapes["beat"].append(beat_after)

    for job_id, job in jobs.items():
        assert job["status"] == "succeeded", (job_id, job, stack.log("worker")[-3000:])
    assert jobs[second]["attempt"] == 2, jobs[second]  # the injected crash was retried

    q = {"queue": "training"}
    assert value(during, "tuneq_worker_steps_total", **q) > 0
    assert value(during, "tuneq_worker_tokens_total", **q) > 0
    assert (
        value(waiting, "tuneq_queue_oldest_job_age_seconds", queue="training", team="metrics") >= 0
    )

    # every step counted once: both jobs' steps, and the crashed attempt's first step
    # (its second raised inside the hook, before it was counted)
    steps = sum(job["progress"]["total_steps"] for job in jobs.values()) + 1
    assert value(after, "tuneq_worker_steps_total", **q) == steps
    trained = sum(job["trained_tokens"] for job in jobs.values())
    assert value(after, "tuneq_worker_tokens_total", **q) > trained  # and attempt 1's step
    assert value(after, "tuneq_worker_step_seconds_count", **q) == steps
    assert value(after, "tuneq_worker_step_seconds_sum", **q) > 0
    assert value(after, "tuneq_worker_eval_seconds_count", **q) >= 2
    assert value(after, "tuneq_worker_checkpoint_upload_seconds_count", **q) >= 2
    assert value(after, "tuneq_worker_checkpoint_upload_bytes_total", **q) > 0
    assert value(after, "tuneq_worker_attempts_started_total", **q) == 3
    assert value(after, "tuneq_worker_attempt_crashes_total", cause="internal_error", **q) == 1
    assert value(after, "tuneq_worker_jobs_running", **q) == 0
    assert value(after, "tuneq_worker_device_memory_bytes", device="cpu") > 0
    assert value(after, "tuneq_worker_device_memory_peak_bytes", device="cpu") > 0
    # the queue emptied: its gauge stays, at 0, and the age of a job that is not there goes
    assert value(beat_after, "tuneq_queue_jobs", queue="training", team="metrics") == 0
    assert (
        "tuneq_queue_oldest_job_age_seconds",
        (("queue", "training"), ("team", "metrics")),
    ) not in beat_after
    assert len(scrapes["worker"]) >= 3 and len(scrapes["beat"]) >= 2  # all parsed above


# --- the collectors alone ----------------------------------------------------------------


def test_the_queue_collector_counts_queued_jobs_per_queue_and_team(tmp_path):
    settings = make_settings(tmp_path / "home")
    migrate(settings)
    engine = make_engine(settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    first = insert_job(sessions)
    with sessions() as db:
        team_id = db.get(Job, first).team_id
        team = db.get(Team, team_id).name
    second = insert_job(sessions, team_id=team_id)
    insert_job(sessions, team_id=team_id, state=JobState.RUNNING)  # not queued
    with transaction(sessions) as db:
        db.get(Job, second).queue = "a100"
        created = db.get(Job, first).created_at
    clock = created + timedelta(seconds=90)
    registry = CollectorRegistry()
    registry.register(QueueCollector(sessions, clock=lambda: clock))

    samples = parse(generate_latest(registry).decode())
    assert value(samples, "tuneq_queue_jobs", queue="training", team=team) == 1
    assert value(samples, "tuneq_queue_jobs", queue="a100", team=team) == 1
    age = value(samples, "tuneq_queue_oldest_job_age_seconds", queue="training", team=team)
    assert age == pytest.approx(90, abs=0.01)

    with transaction(sessions) as db:  # both taken: the gauges stay, at 0, and no age
        for job_id in (first, second):
            db.get(Job, job_id).state = JobState.RUNNING.value
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "tuneq_queue_jobs", queue="training", team=team) == 0
    assert value(samples, "tuneq_queue_jobs", queue="a100", team=team) == 0
    assert not any(name == "tuneq_queue_oldest_job_age_seconds" for name, _ in samples)

    engine.dispose()

    # a database that does not answer: the scrape still does, without queue samples
    unreachable = make_engine("postgresql+psycopg://tuneq:x@127.0.0.1:1/tuneq")
    registry = CollectorRegistry()
    registry.register(QueueCollector(make_sessionmaker(unreachable)))
    assert parse(generate_latest(registry).decode()) == {}
    unreachable.dispose()


def test_attempt_hooks_count_steps_tokens_evaluations_and_uploads(tmp_path):
    metrics = WorkerMetrics(CollectorRegistry())
    seen: list[tuple[str, int]] = []
    hooks = Hooks(
        on_metrics=lambda step, values: seen.append(("metrics", step)),
        on_checkpoint=lambda path, step, values: seen.append(("checkpoint", step)),
    )
    observed = AttemptMetrics(metrics)
    observed.started("a100")
    wrapped = observed.hooks(hooks)
    for step in (1, 2):  # 100 tokens a step at 50 tokens/s: 2 s each
        wrapped.on_metrics(step, {"train_loss": 1.0, "trained_tokens": 100.0 * step,
                                  "tokens_per_second": 50.0})  # fmt: skip
    wrapped.on_metrics(2, {"eval_loss": 1.0})
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    (checkpoint / "state").mkdir()
    (checkpoint / "state" / "optimizer.pt").write_bytes(b"y" * 24)
    wrapped.on_checkpoint(checkpoint, 2, {})
    assert seen == [("metrics", 1), ("metrics", 2), ("metrics", 2), ("checkpoint", 2)]

    resumed = AttemptMetrics(metrics)  # a later attempt resumes at step 2
    resumed.started("a100")
    resumed.hooks(hooks).on_metrics(3, {"train_loss": 1.0, "trained_tokens": 300.0,
                                        "tokens_per_second": 50.0})  # fmt: skip

    samples = parse(generate_latest(metrics.registry).decode())
    q = {"queue": "a100"}
    assert value(samples, "tuneq_worker_steps_total", **q) == 3
    assert value(samples, "tuneq_worker_tokens_total", **q) == 200  # not the resumed step's
    assert value(samples, "tuneq_worker_step_seconds_count", **q) == 2
    assert value(samples, "tuneq_worker_step_seconds_sum", **q) == pytest.approx(4.0)
    assert value(samples, "tuneq_worker_eval_seconds_count", **q) == 1
    assert value(samples, "tuneq_worker_checkpoint_upload_seconds_count", **q) == 1
    assert value(samples, "tuneq_worker_checkpoint_upload_bytes_total", **q) == 1024
    assert value(samples, "tuneq_worker_attempts_started_total", **q) == 2
    assert value(samples, "tuneq_worker_jobs_running", **q) == 2  # neither attempt ended


def test_the_running_gauge_falls_when_the_attempt_ends():
    metrics = WorkerMetrics(CollectorRegistry())
    with pytest.raises(RuntimeError), metrics.attempt() as observed:
        observed.started("training")
        samples = parse(generate_latest(metrics.registry).decode())
        assert value(samples, "tuneq_worker_jobs_running", queue="training") == 1
        raise RuntimeError("the attempt ends badly")
    samples = parse(generate_latest(metrics.registry).decode())
    assert value(samples, "tuneq_worker_jobs_running", queue="training") == 0


def test_memory_is_the_resident_set_on_a_cpu():
    samples = {device: (used, peak) for device, used, peak in memory_by_device()}
    used, peak = samples["cpu"]
    assert 10 * 2**20 < used <= peak  # a Python process with this test's imports


def test_a_metrics_port_in_use_is_logged_not_fatal(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = make_settings(tmp_path, worker_metrics_port=port)
        assert serve_worker_metrics(settings) is False
    assert "metrics not served" in caplog.text
    assert serve_worker_metrics(make_settings(tmp_path, worker_metrics_port=0)) is False
