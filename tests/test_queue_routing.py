"""Jobs go to the worker queue of their model's registry entry (GPU types, scaling out)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import chat
from tests.service_fixtures import api_client, auth, make_settings, migrate, new_team_key
from tuneq.queue import make_celery


@pytest.fixture
def registry_with_queues(tmp_path, tiny_model_dir):
    path = tmp_path / "models.json"
    source = {"type": "local", "path": str(tiny_model_dir)}
    path.write_text(
        json.dumps(
            {
                "models": {
                    "tiny-llama": {"source": source, "tasks": ["causal_lm"]},
                    "tiny-llama-big": {"source": source, "tasks": ["causal_lm"], "queue": "a100"},
                }
            }
        )
    )
    return path


def _messages(settings, queue: str) -> list[list[str]]:
    """The job ids waiting on a queue of the real (filesystem) broker, consumed here."""
    app = make_celery(settings)
    found = []
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            found.append(message.decode()[0])
    return found


def test_a_job_is_published_to_its_models_queue(tmp_path, registry_with_queues):
    settings = make_settings(tmp_path / "home", model_registry=str(registry_with_queues))
    migrate(settings)
    key = new_team_key(settings, "routing")
    rows = "".join(json.dumps(chat(f"q{i}", f"a{i}")) + "\n" for i in range(8)).encode()
    with api_client(settings) as client:
        file_id = client.post("/files", headers=auth(key), files={"file": ("t.jsonl", rows)})
        file_id = file_id.json()["id"]
        ids = {}
        for model in ("tiny-llama", "tiny-llama-big"):
            spec = {"model": model, "training_file": file_id}
            created = client.post("/jobs", headers=auth(key), json=spec)
            assert created.status_code == 201, created.text
            ids[model] = created.json()["id"]
        models = {m["id"]: m for m in client.get("/models", headers=auth(key)).json()["data"]}

    assert _messages(settings, "a100") == [[ids["tiny-llama-big"]]]
    assert _messages(settings, "training") == [[ids["tiny-llama"]]]
    assert models["tiny-llama-big"]["queue"] == "a100"
