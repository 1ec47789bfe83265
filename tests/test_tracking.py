"""Experiment tracking (worker/tracking.py) against the real things: a `mlflow server` on
loopback with a SQLite backend, W&B in offline mode, a real `tuneq worker` on the embedded
stack running a tiny model's job with `integrations`.

- the MLflow run holds the job's params, tags, one train_loss point per step, the eval
  metrics, the adapter's files; its first attempt crashes after a checkpoint (TUNEQ_FAULTS)
  and the second continues the same run;
- the W&B offline run directory's `.wandb` log holds the same steps' history;
- a tracking server that is down (a closed port) never fails the job: one warning event;
- an integration the deployment has not configured is refused at `POST /jobs`, by field.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api_helpers import assert_problem, job_spec, upload
from tests.conftest import chat
from tests.service_fixtures import auth
from tests.sse_helpers import free_port
from tests.stack import all_events, job_ended, running_stack, wait_for

pytest.importorskip("mlflow")
pytest.importorskip("wandb")

pytestmark = [pytest.mark.e2e]

ROWS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)]
# 18 training rows at batch 4: 5 steps an epoch, 10 in all; a checkpoint at 3, 6, 9
HYPER = {"n_epochs": 2, "batch_size": 4, "max_seq_length": 64, "eval_every_steps": 5,
         "checkpoint_every_steps": 3, "early_stopping": None}  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    """`mlflow server` on a free loopback port, SQLite runs and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'runs.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no background job runners (7 huey processes): runs and artifacts are all we need
        env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url, server, root), timeout=120, what="mlflow server")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def _up(url: str, server: subprocess.Popen[bytes], root: Path) -> bool:
    assert server.poll() is None, (root / "server.log").read_text()[-3000:]
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _tracking_runs(events: list[dict]) -> dict[str, str]:
    """type -> run id, from the events that record them."""
    return {
        e["data"]["tracking_run"]["type"]: e["data"]["tracking_run"]["run_id"]
        for e in events
        if "tracking_run" in (e.get("data") or {})
    }


def test_a_job_logs_to_mlflow_and_wandb_and_a_second_attempt_continues_the_run(
    tmp_path, tiny_registry_file, mlflow_url
):
    from mlflow.tracking import MlflowClient

    overrides = {"model_registry": str(tiny_registry_file), "mlflow_tracking_uri": mlflow_url,
                 "wandb_mode": "offline", "wandb_dir": str(tmp_path / "wandb"),
                 "faults": {}}  # fmt: skip
    with running_stack("embedded", tmp_path / "stack", overrides) as stack:
        stack.start("worker", env={"OMP_NUM_THREADS": "1"})
        key = stack.team_key("trackers")
        with stack.client() as api:
            spec = job_spec(upload(api, key, ROWS), validation_split=0.25, hyperparameters=HYPER)
            spec["integrations"] = [{"type": "mlflow", "experiment": "e"},
                                    {"type": "wandb", "project": "p"}]  # fmt: skip
            # the first attempt dies at step 5, after the checkpoint of step 3
            spec["metadata"] = {"fault": "raise", "fault_step": "5", "fault_attempts": "1"}
            created = api.post("/jobs", headers=auth(key), json=spec)
            assert created.status_code == 201, created.text
            job = job_ended(api, key, created.json()["id"])
            events = all_events(api, key, job["id"])
        assert job["status"] == "succeeded", (job, stack.log("worker")[-3000:])

    assert any(e["message"].startswith("attempt 2 started") for e in events)
    warned = [e["message"] for e in events if e["level"] == "warning"]
    assert not [m for m in warned if "track" in m], warned
    runs = _tracking_runs(events)
    assert set(runs) == {"mlflow", "wandb"}
    steps = job["result"]["steps"]
    assert steps == 10

    client = MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("e")
    found = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in found] == [runs["mlflow"]]  # one run: attempt 2 continued it
    run = client.get_run(runs["mlflow"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["tuneq.job_id"] == job["id"]
    assert run.data.tags["tuneq.team"] == "trackers"
    assert run.data.tags["tuneq.model"] == "tiny-llama" and run.data.tags["tuneq.method"] == "lora"
    params = run.data.params
    assert params["method.r"] == "4" and params["hyperparameters.batch_size"] == "4"
    assert params["model"] == "tiny-llama" and "estimate.total_steps" in params
    assert any(name.startswith("engine.") for name in params)
    history = client.get_metric_history(run.info.run_id, "train_loss")
    # every step once; steps 4 of attempt 1 is logged again by attempt 2 (resumed from 3)
    assert sorted({m.step for m in history}) == list(range(1, steps + 1))
    assert len(history) in {steps, steps + 1}
    evals = client.get_metric_history(run.info.run_id, "eval_loss")
    assert [m.step for m in evals][-2:] == [5, 10]
    adapter = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= adapter
    assert run.data.tags["tuneq.adapter_key"].endswith("/attempts/2/adapter.tar.gz")

    # W&B: one offline run directory per attempt, the same run id (`wandb sync` joins them)
    assert len(list((tmp_path / "wandb").rglob(f"run-{runs['wandb']}.wandb"))) == 2
    logged = _wandb_history(tmp_path / "wandb", runs["wandb"])
    assert sorted({step for step, item in logged if "train_loss" in item}) == list(
        range(1, steps + 1)
    )
    assert {step for step, item in logged if "eval_loss" in item} >= {5, 10}


def test_a_tracking_server_that_is_down_never_fails_the_job(tmp_path, tiny_registry_file):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    overrides = {"model_registry": str(tiny_registry_file), "mlflow_tracking_uri": down}
    with running_stack("embedded", tmp_path / "stack", overrides) as stack:
        stack.start("worker", env={"OMP_NUM_THREADS": "1"})
        key = stack.team_key("offline")
        with stack.client() as api:
            spec = job_spec(upload(api, key, ROWS), validation_split=0.25, hyperparameters=HYPER)
            # W&B is not configured on this deployment: refused, naming the entry
            spec["integrations"] = [{"type": "wandb", "project": "p"}]
            refused = assert_problem(api.post("/jobs", headers=auth(key), json=spec), 422)
            assert refused["errors"][0]["field"] == "integrations[0].type"
            assert "TUNEQ_WANDB_MODE" in refused["detail"]

            spec["integrations"] = [{"type": "mlflow", "experiment": "e"}]
            created = api.post("/jobs", headers=auth(key), json=spec)
            assert created.status_code == 201, created.text
            job = job_ended(api, key, created.json()["id"])
            events = all_events(api, key, job["id"])
        assert job["status"] == "succeeded", (job, stack.log("worker")[-3000:])

    warnings = [e for e in events if e["level"] == "warning"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["message"].startswith("MLflow tracking failed")
    assert warnings[0]["data"] == {"integration": "integrations[0]", "type": "mlflow"}
    undelivered = [e for e in events if "not delivered" in e["message"]]
    assert len(undelivered) == 1 and undelivered[0]["data"]["undelivered"] > 0
    assert not _tracking_runs(events)


# -- W&B's offline log ----------------------------------------------------------------------
# A run's `run-<id>.wandb` is a LevelDB-style log (the format `wandb sync` uploads): a
# 7-byte header (":W&B", magic, version), then 32 KiB blocks of records, each a 7-byte
# header (CRC32, length, type: full, first, middle, last) and a protobuf `Record`.
_BLOCK, _HEADER = 32 * 1024, 7


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, position, partial = [], _HEADER, b""
    while position + _HEADER <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < _HEADER:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _HEADER])
        body = data[position + _HEADER : position + _HEADER + length]
        position += _HEADER + length
        if kind == 0 and length == 0:
            continue
        partial += body
        if kind in {1, 4}:  # full, last
            records.append(partial)
            partial = b""
    return records


def _wandb_history(root: Path, run_id: str) -> list[tuple[int, dict[str, float]]]:
    """(step, {key: value}) of every history row of the run, attempts in order."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(root.rglob(f"run-{run_id}.wandb"))
    assert files, list(root.rglob("*"))
    rows = []
    for path in files:
        for raw in _wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            values = {k: json.loads(v) for k, v in items.items() if not k.startswith("_")}
            rows.append((record.history.step.num, values))
    return rows


class _Server:
    """A tracker's far end that can be down: what it received, in order."""

    kind, label = "mlflow", "MLflow"

    def __init__(self) -> None:
        self.down, self.received = True, []

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("connection refused")

    def start(self, run_id, name, tags):
        self._check()
        return run_id or "run-1"

    def metrics(self, step, values):
        self._check()
        self.received.append(step)


def test_a_tracker_buffers_in_order_while_its_server_is_down_and_warns_once(monkeypatch):
    from worker import tracking

    monkeypatch.setattr(tracking, "BUFFER", 3)
    server, warned, recorded = _Server(), [], []
    tracker = tracking._Tracker(
        server, 0, "e", lambda *told: warned.append(told),
        lambda _, run_id: recorded.append(run_id), None, ("job-1", {}),
    )  # fmt: skip
    for step in range(1, 6):  # the first fails; the rest wait for the retry, the oldest drop
        tracker.call(f"step {step}", lambda step=step: server.metrics(step, {"loss": 1.0}))
    assert len(warned) == 1 and warned[0][0].startswith("MLflow tracking failed")
    assert [what for what, _ in tracker.pending] == ["step 3", "step 4", "step 5"]
    assert tracker.dropped == 2 and server.received == [] and recorded == []

    server.down = False
    assert tracker.flush()
    assert server.received == [3, 4, 5] and recorded == ["run-1"] and not tracker.pending
    assert len(warned) == 1
