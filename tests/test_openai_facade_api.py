"""The OpenAI-compatible facade through the official `openai` client, over the real app.

No worker here: what needs none (files, creating, steering and reading jobs, the errors and
who may see what) runs on SQLite and on PostgreSQL, the client given the app through its
`http_client` (tests/test_openai_facade.py drives a real server and worker end to end).
The mapping itself (tuneq's states in OpenAI's vocabulary, the create body translated into
a job spec) is checked here too, against the installed client's own types.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.fine_tuning import FineTuningJob as ClientJob

from api.openai.objects import STATUS, FineTuningJob, learning_rate_multiplier
from api.openai.requests import JobCreate, translate
from tests.api_helpers import TRAIN_ROWS, assert_problem, deployed_api, jsonl
from tests.preference_helpers import PAIRS
from tests.service_fixtures import auth
from tests.test_api_access import app_endpoints
from tuneq.errors import InvalidRequest
from tuneq.jobs.states import JobState

PREFIX = "/openai/v1"
MISSING_JOB = "job-" + "0" * 26
MISSING_FILE = "file-" + "0" * 26
BAD_FILE = jsonl(TRAIN_ROWS[:1]) + b"{not json\n" + jsonl(TRAIN_ROWS[1:3])
# A tiny LoRA whose data fits the tiny model: the native fields ride in `tuneq`.
NATIVE = {
    "method": {"type": "lora", "r": 4, "alpha": 8},
    "hyperparameters": {"max_seq_length": 64},
}


@dataclass
class World:
    http: TestClient
    a: openai.OpenAI
    b: openai.OpenAI
    key_a: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(request, tmp_path_factory, tiny_registry_file) -> Iterator[World]:
    home = tmp_path_factory.mktemp(f"openai-{request.param}")
    with deployed_api(request.param, home, tiny_registry_file, "team-a", "team-b") as api:
        clients = [
            openai.OpenAI(
                base_url=f"http://testserver{PREFIX}", api_key=key, http_client=api.client
            )
            for key in api.keys
        ]
        yield World(api.client, *clients, key_a=api.keys[0])


def _train_file(client: openai.OpenAI) -> str:
    return client.files.create(file=("train.jsonl", jsonl(TRAIN_ROWS)), purpose="fine-tune").id


def _create(client: openai.OpenAI, training_file: str, **options: Any) -> Any:
    return client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=training_file,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        extra_body={"tuneq": NATIVE},
        **options,
    )


# ------------------------------------------------------------------------------ mapping


def test_every_state_is_a_status_of_openais_vocabulary():
    vocabulary = set(typing.get_args(ClientJob.model_fields["status"].annotation))

    assert set(STATUS) == {str(state) for state in JobState}
    assert set(STATUS.values()) <= vocabulary
    assert STATUS["cancelling"] == "running" and STATUS["paused"] == "queued"


def _native_job(state: str, **changes: Any) -> dict[str, Any]:
    """A native job document as `GET /jobs/{id}` shows it."""
    job = {
        "id": "job-1", "object": "job", "status": state, "model": "tiny-llama",
        "task": "causal_lm", "method": {"type": "lora", "r": 4},
        "hyperparameters": {"n_epochs": 2, "batch_size": 4, "learning_rate": 1e-4, "seed": 7},
        "training_file": "file-1", "validation_file": None, "suffix": "bot", "metadata": {},
        "estimate": {"estimated_seconds": 60.0}, "progress": None, "attempt": 1,
        "trained_tokens": None, "error": None, "result": None, "timings": None,
        "cancel_requested": False,
        "created_at": 1_700_000_000, "started_at": 1_700_000_010, "finished_at": None,
    }  # fmt: skip
    return job | changes


@pytest.mark.parametrize("state", [str(s) for s in JobState])
def test_a_job_in_every_state_is_a_valid_openai_job(state):
    error = {"code": "invalid_training_file", "message": "bad", "param": None}
    native = _native_job(state, error=error if state == "failed" else None)

    shown = FineTuningJob.of(native, organization_id="team-1").model_dump(mode="json")
    job = ClientJob.model_validate(shown)  # the client's own type, validated strictly

    assert job.status == STATUS[state] and job.tuneq["status"] == state
    assert job.hyperparameters.learning_rate_multiplier == 0.5  # 1e-4 of LoRA's 2e-4
    assert job.method.type == "supervised" and job.seed == 7 and job.organization_id == "team-1"
    assert (job.fine_tuned_model is not None) == (state == "succeeded")
    assert (job.estimated_finish is not None) == (STATUS[state] == "running")
    assert (job.error is not None) == (state == "failed")


def test_the_fine_tuned_model_names_the_job_and_its_suffix():
    job = FineTuningJob.of(_native_job("succeeded"), organization_id="team-1")

    assert job.fine_tuned_model == "ft:tiny-llama:team-1:bot:job-1"


def test_hyperparameters_come_from_the_method_or_the_deprecated_top_level():
    for body in (
        {"hyperparameters": {"n_epochs": 3, "batch_size": 8}},
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3,
                                                                            "batch_size": 8}}}},
    ):  # fmt: skip
        spec = translate(JobCreate(model="m", training_file="f", seed=5, **body)).body
        assert spec["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "seed": 5}


def test_the_learning_rate_multiplier_multiplies_the_methods_default_rate():
    hp = {"hyperparameters": {"learning_rate_multiplier": 2.0}}
    for native_method, default in ((None, 2e-4), ({"type": "ia3"}, 3e-3)):
        extension = {"tuneq": {"method": native_method}} if native_method else {}
        spec = translate(JobCreate(model="m", training_file="f", **hp, **extension)).body
        assert spec["hyperparameters"]["learning_rate"] == pytest.approx(2 * default)
        method = native_method or {"type": "lora"}
        assert learning_rate_multiplier(method, 2 * default) == 2.0


def test_a_multiplier_on_a_method_with_inconsistent_options_leaves_the_refusal_to_the_spec():
    # AdaLoRA's target_r must be below init_r: a rule across fields, raised as a SpecError
    hp = {"hyperparameters": {"learning_rate_multiplier": 2.0}}
    extension = {"tuneq": {"method": {"type": "adalora", "init_r": 8, "target_r": 8}}}
    spec = translate(JobCreate(model="m", training_file="f", **hp, **extension)).body
    assert "learning_rate" not in spec.get("hyperparameters", {})  # parse_spec refuses it
    assert spec["method"] == {"type": "adalora", "init_r": 8, "target_r": 8}


def test_a_native_method_and_native_fields_pass_through_the_extension():
    extension = {"method": {"type": "loha", "r": 8}, "task": "causal_lm",
                 "hyperparameters": {"max_steps": 5}}  # fmt: skip
    request = JobCreate(
        model="m", training_file="f", hyperparameters={"n_epochs": 2}, tuneq=extension
    )

    translation = translate(request)

    assert translation.body["method"] == {"type": "loha", "r": 8}
    assert translation.body["hyperparameters"] == {"n_epochs": 2, "max_steps": 5}
    # An error about a field names it where the request put it.
    assert translation.param("method.r") == "tuneq.method.r"
    assert translation.param("hyperparameters.n_epochs") == "hyperparameters.n_epochs"
    assert translation.param("hyperparameters.max_steps") == "tuneq.hyperparameters.max_steps"
    assert translation.param("hyperparameters.packing") == "tuneq.hyperparameters.packing"


def test_openais_dpo_is_the_dpo_objective_on_the_native_method():
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2,
                                                     "learning_rate_multiplier": 0.5}}}  # fmt: skip
    for extension, method in (
        ({}, {}),
        ({"tuneq": {"method": {"type": "loha", "r": 8}}}, {"type": "loha", "r": 8}),
    ):
        translation = translate(JobCreate(model="m", training_file="f", method=dpo, **extension))

        objective = {"type": "dpo", "beta": 0.2}
        assert translation.body["method"] == method | {"objective": objective}
        assert translation.body["hyperparameters"]["n_epochs"] == 2
        assert translation.param("method.objective.beta") == "method.dpo.hyperparameters.beta"
    assert translation.body["hyperparameters"]["learning_rate"] == pytest.approx(0.5 * 2e-4)


def test_a_dpo_job_shows_openais_dpo_method_with_its_beta():
    method = {"type": "lora", "r": 4, "objective": {"type": "dpo", "beta": 0.2}}

    shown = FineTuningJob.of(_native_job("queued", method=method), organization_id="team-1")
    job = ClientJob.model_validate(shown.model_dump(mode="json"))

    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.method.dpo.hyperparameters.learning_rate_multiplier == 0.5


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"method": {"type": "dpo"}, "tuneq": {"method": {"objective": {"type": "dpo"}}}},
         "tuneq.method.objective"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "lora"}}, "method.type"),
        ({"integrations": [{"type": "wandb", "wandb": {"project": "p"}}]}, "integrations"),
        ({"hyperparameters": {"learning_rate_multiplier": "high"}},
         "hyperparameters.learning_rate_multiplier"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}},
         "hyperparameters.learning_rate_multiplier"),
        ({"seed": 1, "tuneq": {"hyperparameters": {"seed": 2}}}, "tuneq.hyperparameters.seed"),
        ({"suffix": "a", "tuneq": {"suffix": "b"}}, "tuneq.suffix"),
        (
            {"hyperparameters": {"learning_rate_multiplier": 2.0},
             "tuneq": {"hyperparameters": {"learning_rate": 0.1}}},
            "tuneq.hyperparameters.learning_rate",
        ),
        (
            {"hyperparameters": {"n_epochs": 1},
             "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
            "hyperparameters",
        ),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_refused_naming_its_field(body, param):
    with pytest.raises(InvalidRequest) as refused:
        translate(JobCreate(model="m", training_file="f", **body))

    assert refused.value.param == param


# ------------------------------------------------------------------------------ files


def test_upload_list_retrieve_download_and_delete_a_file(world):
    created = world.a.files.create(file=("train.jsonl", jsonl(TRAIN_ROWS)), purpose="fine-tune")

    assert created.object == "file" and created.status == "processed"
    assert created.purpose == "fine-tune" and created.bytes == len(jsonl(TRAIN_ROWS))
    assert created.tuneq["format"] == "chat" and created.tuneq["examples"] == len(TRAIN_ROWS)
    assert world.a.files.retrieve(created.id).filename == "train.jsonl"
    assert created.id in {f.id for f in world.a.files.list()}
    assert world.a.files.content(created.id).read() == jsonl(TRAIN_ROWS)
    deleted = world.a.files.delete(created.id)
    assert deleted.deleted is True and deleted.id == created.id
    with pytest.raises(openai.NotFoundError):
        world.a.files.retrieve(created.id)


def test_the_files_list_pages_with_after_and_limit(world):
    ids = [_train_file(world.b) for _ in range(3)]

    pages = world.b.files.list(limit=1)

    assert len(pages.data) == 1 and pages.has_more
    assert [f.id for f in pages][:3] == ids[::-1]  # newest first


def test_a_bad_file_is_a_bad_request_naming_its_line(world):
    with pytest.raises(openai.BadRequestError) as refused:
        world.a.files.create(file=("bad.jsonl", BAD_FILE), purpose="fine-tune")

    error = refused.value
    assert error.status_code == 400 and error.code == "invalid_training_file"
    assert error.param == "file" and "line 2" in error.message
    assert [item["line"] for item in error.body["errors"]] == [2]


def test_the_idempotency_key_is_shared_with_the_native_upload(world):
    key = {"Idempotency-Key": "upload-once"}
    first = world.a.files.create(
        file=("t.jsonl", jsonl(TRAIN_ROWS)), purpose="fine-tune", extra_headers=key
    )

    again = world.http.post(
        "/files", headers=auth(world.key_a) | key, files={"file": ("t.jsonl", jsonl(TRAIN_ROWS))}
    )

    assert again.status_code == 201 and again.json()["id"] == first.id


def test_another_teams_file_is_not_found(world):
    theirs = _train_file(world.a)

    for call in (world.b.files.retrieve, world.b.files.delete, world.b.files.content):
        with pytest.raises(openai.NotFoundError):
            call(theirs)


# ------------------------------------------------------------------------------ jobs


def test_create_retrieve_pause_resume_and_cancel_a_job(world):
    job = _create(
        world.a, _train_file(world.a), suffix="bot", seed=3, metadata={"purpose": "facade"}
    )

    assert job.object == "fine_tuning.job" and job.status == "queued"
    assert job.model == "tiny-llama" and job.seed == 3 and job.metadata == {"purpose": "facade"}
    assert job.hyperparameters.n_epochs == 1 and job.tuneq["method"]["r"] == 4
    assert job.fine_tuned_model is None and job.integrations == [] and job.result_files == []
    assert world.a.fine_tuning.jobs.retrieve(job.id).model_dump() == job.model_dump()

    paused = world.a.fine_tuning.jobs.pause(job.id)
    assert paused.status == "queued" and paused.tuneq["status"] == "paused"
    assert world.a.fine_tuning.jobs.resume(job.id).tuneq["status"] == "queued"
    cancelled = world.a.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError):
        world.a.fine_tuning.jobs.cancel(job.id)
    events = list(world.a.fine_tuning.jobs.list_events(job.id, limit=2))
    messages = [e.message for e in events]  # newest first, two a page
    assert messages[:3] == ["cancelled before it ran", "resumed; queued again", "paused"]
    assert len(messages) == 4 and messages[-1].startswith("job created")
    assert all(e.object == "fine_tuning.job.event" for e in events)
    assert world.a.fine_tuning.jobs.checkpoints.list(job.id).data == []


def test_a_dpo_job_trains_on_a_preference_file(world):
    pairs = world.a.files.create(file=("pairs.jsonl", jsonl(PAIRS)), purpose="fine-tune")
    dpo = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1}}}

    job = world.a.fine_tuning.jobs.create(
        model="tiny-llama", training_file=pairs.id, method=dpo, extra_body={"tuneq": NATIVE}
    )

    assert pairs.tuneq["format"] == "preference" and job.status == "queued"
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    assert job.tuneq["method"]["objective"]["type"] == "dpo"
    assert job.tuneq["hyperparameters"]["packing"] is False


def test_the_jobs_list_pages_newest_first(world):
    file_id = _train_file(world.b)
    ids = [_create(world.b, file_id).id for _ in range(3)]

    first = world.b.fine_tuning.jobs.list(limit=1)

    assert [j.id for j in first.data] == [ids[-1]] and first.has_more
    assert [j.id for j in first][:3] == ids[::-1]
    tagged = world.b.fine_tuning.jobs.list(metadata={"never": "set"})
    assert tagged.data == []


def test_an_invalid_spec_is_a_bad_request_naming_the_field_as_sent(world):
    file_id = _train_file(world.a)
    supervised = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}
    cases = [
        ({"method": supervised}, "method.supervised.hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "dpo"}}, "training_file"),  # chat data, not preference pairs
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
            "method.dpo.hyperparameters.beta",
        ),
        (
            {"method": {"type": "dpo"}, "extra_body": {"tuneq": {"method": {"type": "full"}}}},
            "tuneq.method.type",
        ),
        ({"extra_body": {"tuneq": {"method": {"type": "lora", "r": 0}}}}, "tuneq.method.r"),
        ({"extra_body": {"tuneq": {"colour": "blue"}}}, "tuneq.colour"),
        ({"model": "no-such-model"}, "model"),
        ({"training_file": MISSING_FILE}, "training_file"),
    ]
    for options, param in cases:
        body = {"model": "tiny-llama", "training_file": file_id} | options
        with pytest.raises(openai.BadRequestError) as refused:
            world.a.fine_tuning.jobs.create(**body)
        assert refused.value.param == param, (options, refused.value.body)
        assert refused.value.body["type"] == "invalid_request_error"
        if "hyperparameters" in param:  # the message too names the field as it was sent
            assert refused.value.body["message"].startswith(f"{param}: "), refused.value.body


def test_another_teams_job_is_not_found_like_a_missing_one(world):
    job = _create(world.a, _train_file(world.a))
    jobs = world.b.fine_tuning.jobs

    for job_id in (job.id, MISSING_JOB):
        for call in (jobs.retrieve, jobs.cancel, jobs.pause, jobs.resume):
            with pytest.raises(openai.NotFoundError) as missing:
                call(job_id)
            assert missing.value.param == "job_id"
        with pytest.raises(openai.NotFoundError):
            jobs.list_events(job_id)
        with pytest.raises(openai.NotFoundError):
            jobs.checkpoints.list(job_id)
    assert world.a.fine_tuning.jobs.retrieve(job.id).status == "queued"  # the control


# ------------------------------------------------------------------------------ errors


def test_without_a_valid_key_the_client_raises_authentication_error(world):
    anonymous = world.a.with_options(api_key="tq_not-a-key")

    with pytest.raises(openai.AuthenticationError) as refused:
        anonymous.fine_tuning.jobs.list()

    assert refused.value.body["type"] == "authentication_error"
    assert refused.value.response.headers["www-authenticate"] == "Bearer"


def test_fastapis_own_errors_are_openai_shaped_under_the_facade_only(world):
    a = auth(world.key_a)
    not_an_object = world.http.post(f"{PREFIX}/fine_tuning/jobs", headers=a, json=[1])
    unknown = world.http.get(f"{PREFIX}/no-such-thing", headers=a)
    wrong_limit = world.http.get(f"{PREFIX}/fine_tuning/jobs?limit=0", headers=a)

    for response, status, param in (
        (not_an_object, 400, ""),
        (unknown, 404, None),
        (wrong_limit, 400, "limit"),
    ):
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["param"] == (param or None)
    # The native routes keep problem+json.
    assert_problem(world.http.get("/jobs?limit=0", headers=a), 422)
    assert_problem(world.http.get("/no-such-thing", headers=a), 404)


def test_every_facade_endpoint_needs_a_key(world):
    from api.app import create_app

    endpoints = {e for e in app_endpoints(create_app(world.http.app.state.settings)) if PREFIX in e}
    assert len(endpoints) == 13
    for endpoint in sorted(endpoints):
        method, path = endpoint.split(" ")
        url = path.format(file_id=MISSING_FILE, job_id=MISSING_JOB)
        response = world.http.request(method, url)
        assert response.status_code == 401, endpoint
        assert json.loads(response.text)["error"]["type"] == "authentication_error"
