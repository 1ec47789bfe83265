"""Merged export through the service, on real processes (API, worker, beat) of the embedded
and the production stack (PostgreSQL, Redis, S3 over HTTP): refused at submit for a method
that cannot merge; built by the worker after a job that asks for it; built on demand by
`POST /jobs/{id}/exports`, once per dtype; a failed export leaves the adapter."""

from __future__ import annotations

import io
import tarfile

import httpx
import pytest
import torch

from tests.api_helpers import job_spec, jsonl
from tests.conftest import chat, logits_from_plain_peft
from tests.service_fixtures import api_client, auth
from tests.stack import running_stack, wait_for
from tests.test_export import INPUT_IDS, logits_from_plain_transformers

pytestmark = pytest.mark.e2e

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_registry_file):
    overrides = {
        "model_registry": str(tiny_registry_file),
        "relay_interval_seconds": 1.0,
        "estimated_tokens_per_second": 1000.0,
    }
    home = tmp_path_factory.mktemp(f"export-{request.param}")
    with running_stack(request.param, home, overrides) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def key(stack):
    return stack.team_key("export")


@pytest.fixture(scope="module")
def train_file(api, key):
    response = api.post("/files", headers=auth(key), files={"file": ("t.jsonl", jsonl(TRAIN))},
                        data={"purpose": "fine-tune"})  # fmt: skip
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _spec(train_file, **changes):
    spec = job_spec(train_file, validation_split=0.0, **changes)
    spec["hyperparameters"] |= {"n_epochs": 1}
    return spec


def _artifacts(api, key, job_id):
    page = api.get(f"/jobs/{job_id}/artifacts", headers=auth(key)).json()
    return {a["name"]: a for a in page["data"]}


def _download(api, key, job_id, name, target):
    url = f"/jobs/{job_id}/artifacts/{name}"
    response = api.get(url, headers=auth(key), follow_redirects=False)
    if response.status_code == 307:  # S3: a short-lived presigned URL, fetched without our key
        response = httpx.get(response.headers["location"])
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(target, filter="data")
    return target


def _wait_artifact(api, key, job_id, name):
    return wait_for(lambda: _artifacts(api, key, job_id).get(name), timeout=180,
                    what=f"{name} of {job_id}")  # fmt: skip


def test_a_method_that_cannot_merge_is_refused_at_submit(api, key, train_file):
    spec = _spec(train_file, method={"type": "prompt_tuning"}, export={"merged": True})
    response = api.post("/jobs", headers=auth(key), json=spec)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["param"] == "export.merged" and "virtual tokens" in problem["detail"]


def test_a_finished_job_whose_method_cannot_merge_is_refused_on_demand(
    api, key, train_file, worker
):
    spec = _spec(train_file, method={"type": "prompt_tuning"})
    created = api.post("/jobs", headers=auth(key), json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    wait_for(lambda: api.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "succeeded",
             timeout=180, what=f"{job_id} to succeed")  # fmt: skip
    response = api.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "bf16"})
    assert response.status_code == 422, response.text
    assert response.json()["param"] == "merged" and "virtual tokens" in response.json()["detail"]


def test_the_worker_exports_after_training_and_on_demand(
    api, key, train_file, worker, stack, tmp_path, tiny_model_dir
):
    spec = _spec(train_file, export={"merged": True, "dtype": "fp32"})
    created = api.post("/jobs", headers=auth(key), json=spec)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    assert created.json()["export"] == {"merged": True, "dtype": "fp32"}
    early = api.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "bf16"})
    assert early.status_code == 409, early.text  # not succeeded yet (queued or running)

    merged = _wait_artifact(api, key, job_id, "merged-fp32.tar.gz")
    assert merged["kind"] == "merged" and merged["bytes"] > 0, stack.log("worker")[-3000:]
    assert "adapter.tar.gz" in _artifacts(api, key, job_id)
    assert "lease lost" not in stack.log("worker")  # the export runs after the lease is done
    model = _download(api, key, job_id, "merged-fp32.tar.gz", tmp_path / "merged")
    adapter = _download(api, key, job_id, "adapter.tar.gz", tmp_path / "adapter")
    got = logits_from_plain_transformers(model, INPUT_IDS, tmp_path)
    expected = logits_from_plain_peft(tiny_model_dir, adapter, INPUT_IDS, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    asked = api.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "bf16"})
    assert asked.status_code == 202, asked.text
    assert asked.json() == {"object": "job.export", "job_id": job_id, "dtype": "bf16",
                            "artifact": "merged-bf16.tar.gz", "status": "queued"}  # fmt: skip
    _wait_artifact(api, key, job_id, "merged-bf16.tar.gz")
    again = api.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "bf16"})
    assert again.status_code == 200 and again.json()["status"] == "ready"
    events = api.get(f"/jobs/{job_id}/events", params={"limit": 100}, headers=auth(key))
    ready = [e for e in events.json()["data"] if e["message"].startswith("merged export ready")]
    assert {e["data"]["artifact"] for e in ready} == {"merged-fp32.tar.gz", "merged-bf16.tar.gz"}


def test_a_failed_export_is_a_warning_and_the_job_keeps_its_adapter(api, key, stack, worker):
    """The adapter's stored object taken away while an export runs (a store that lost it):
    the export fails with a warning event naming the cause; the job stays succeeded."""
    if stack.name != "embedded":
        pytest.skip("takes the adapter away from the local store")
    jobs = api.get("/jobs", headers=auth(key)).json()["data"]
    job_id = next(j["id"] for j in jobs if j["status"] == "succeeded" and j["export"])
    (stored,) = stack.settings.resolved_store_dir.glob(f"jobs/{job_id}/attempts/*/adapter.tar.gz")
    aside = stored.rename(stored.with_name("moved-away"))
    try:
        asked = api.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "fp16"})
        assert asked.status_code == 202, asked.text

        def failed():
            page = api.get(f"/jobs/{job_id}/events", params={"limit": 100}, headers=auth(key))
            return [e for e in page.json()["data"] if e["data"].get("code") == "export_failed"]

        (event,) = wait_for(failed, timeout=120, what="the export's warning")
    finally:
        aside.rename(stored)
    assert event["level"] == "warning" and event["data"]["artifact"] == "merged-fp16.tar.gz"
    assert "adapter is unaffected" in event["message"] and event["data"]["error"]
    assert api.get(f"/jobs/{job_id}", headers=auth(key)).json()["status"] == "succeeded"
    assert "merged-fp16.tar.gz" not in _artifacts(api, key, job_id)
    assert api.get(f"/jobs/{job_id}/artifacts/adapter.tar.gz", headers=auth(key)).status_code == 200


def test_an_ask_the_broker_refuses_is_a_503_that_leaves_nothing(api, key, stack, worker):
    """The API process's broker unreachable (a closed port): 503, and no "requested" event."""
    jobs = api.get("/jobs", headers=auth(key)).json()["data"]
    job_id = next(j["id"] for j in jobs if j["status"] == "succeeded" and j["export"])

    def asked() -> int:
        page = api.get(f"/jobs/{job_id}/events", params={"limit": 100}, headers=auth(key))
        return sum(e["message"] == "merged export (fp16) requested" for e in page.json()["data"])

    before = asked()
    cut_off = stack.settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with api_client(cut_off) as away:
        refused = away.post(f"/jobs/{job_id}/exports", headers=auth(key), json={"dtype": "fp16"})
    assert refused.status_code == 503, refused.text
    assert refused.json()["code"] == "unavailable" and "ask again" in refused.json()["detail"]
    assert asked() == before
