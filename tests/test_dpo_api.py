"""Preference data and DPO jobs through the real app (SQLite, a local store): a preference
file is validated at upload like the others, and a job whose file, objective and method do
not go together is refused at `POST /jobs`, naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api_helpers import TRAIN_ROWS, DeployedApi, assert_problem, deployed_api, job_spec, jsonl
from tests.api_helpers import upload as upload_rows
from tests.preference_helpers import PAIRS
from tests.service_fixtures import auth

DPO_LORA = {"type": "lora", "r": 4, "alpha": 8, "objective": {"type": "dpo", "beta": 0.2}}


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_registry_file) -> Iterator[DeployedApi]:
    home = tmp_path_factory.mktemp("dpo-api")
    with deployed_api("sqlite", home, tiny_registry_file, "team-a") as deployed:
        yield deployed


def _upload(api: DeployedApi, data: bytes):
    return api.client.post("/files", headers=auth(api.keys[0]), files={"file": ("p.jsonl", data)})


def test_a_preference_file_is_validated_and_reported(api):
    response = _upload(api, jsonl(PAIRS))

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "preference" and body["examples"] == len(PAIRS)
    assert body["report"]["max_example_chars"] > 0


def test_a_preference_file_with_a_bad_line_is_refused_with_its_number(api):
    bad = {**PAIRS[2], "preferred_output": [{"role": "user", "content": "4"}]}
    data = jsonl([PAIRS[0], PAIRS[1], bad, PAIRS[3]])

    body = assert_problem(_upload(api, data), 422)

    assert body["code"] == "invalid_training_file" and body["total_errors"] == 1
    assert body["errors"][0]["line"] == 3
    assert body["errors"][0]["field"] == "preferred_output[0].role"


def test_a_dpo_dry_run_counts_both_answers_with_packing_off(api):
    pairs = upload_rows(api.client, api.keys[0], PAIRS)
    spec = job_spec(pairs, method=DPO_LORA)

    response = api.client.post("/jobs?dry_run=true", headers=auth(api.keys[0]), json=spec)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["method"]["objective"] == {
        "type": "dpo",
        "beta": 0.2,
        "label_smoothing": 0.0,
        "sft_weight": 0.0,
    }
    assert body["hyperparameters"]["packing"] is False
    chosen_only = [{"messages": [*p["input"]["messages"], *p["preferred_output"]]} for p in PAIRS]
    chats = upload_rows(api.client, api.keys[0], chosen_only)
    sft = api.client.post("/jobs?dry_run=true", headers=auth(api.keys[0]), json=job_spec(chats))
    # each pair is its prompt with the preferred answer, and again with the other one
    assert body["estimate"]["trained_tokens"] > sft.json()["estimate"]["trained_tokens"]


@pytest.mark.parametrize(
    ("rows", "method", "hyperparameters", "field"),
    [
        (PAIRS, {"type": "lora"}, {}, "training_file"),  # pairs need a preference objective
        (TRAIN_ROWS, DPO_LORA, {}, "training_file"),  # DPO needs pairs
        (PAIRS, {"type": "full", "objective": {"type": "dpo"}}, {}, "method.type"),
        (PAIRS, DPO_LORA, {"packing": True}, "hyperparameters.packing"),
    ],
    ids=["pairs-with-sft", "chats-with-dpo", "full-with-dpo", "packing"],
)
def test_a_dpo_job_that_cannot_run_is_refused_naming_the_field(
    api, rows, method, hyperparameters, field
):
    spec = job_spec(upload_rows(api.client, api.keys[0], rows), method=method)
    spec["hyperparameters"] |= hyperparameters

    problem = assert_problem(api.client.post("/jobs", headers=auth(api.keys[0]), json=spec), 422)

    named = {e.get("field") for e in problem.get("errors", [])} | {problem.get("param")}
    assert field in named, problem
