"""A classification job and an NER job through the whole service, on the embedded stack.

Upload (CSV for classification), create, train in a real `tuneq worker`, read the task's
metrics on `GET /jobs/{id}/metrics` and its report in the result, download the output and
reload it with `peft_engine.load_trained`. Also: an unsupported method × task pair is
refused at `POST /jobs` with a problem+json naming it, and `GET /models` shows the table.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile

import pytest

from tests.conftest import build_tiny_bert
from tests.service_fixtures import auth
from tests.stack import Stack, trained_job

pytestmark = pytest.mark.e2e

SENTIMENT = {"great": "positive", "good": "positive", "awful": "negative", "bad": "negative"}
NOUNS = ("film", "movie", "plot", "a film")
PEOPLE, PLACES = ("alice", "bob", "carol", "dave"), ("paris", "rome", "berlin", "oslo")


def _reviews_csv(repeat: int) -> bytes:
    rows = ["text,label"]
    for _ in range(repeat):
        rows += [f'"the {n} was {w}",{label}' for n in NOUNS for w, label in SENTIMENT.items()]
    return ("\n".join(rows) + "\n").encode()


def _sentences(n: int) -> bytes:
    lines = []
    for i in range(n):
        tokens = [PEOPLE[i % 4], "visited", PLACES[i % 3], "and", "saw", PEOPLE[(i + 1) % 4]]
        tags = ["B-PER", "O", "B-LOC", "O", "O", "B-PER"]
        lines.append(json.dumps({"tokens": tokens, "tags": tags}))
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, bert_dir, tiny_model_dir):
    home = tmp_path_factory.mktemp("stack-classification")
    registry = home / "models.json"
    registry.write_text(
        json.dumps(
            {
                "models": {
                    "tiny-bert": {
                        "source": {"type": "local", "path": str(bert_dir)},
                        "family": "bert",
                        "tasks": ["seq_classification", "token_classification"],
                    },
                    "tiny-llama": {
                        "source": {"type": "local", "path": str(tiny_model_dir)},
                        "family": "llama",
                        "tasks": ["causal_lm"],
                    },
                }
            }
        )
    )
    deployment = Stack(
        "embedded",
        home,
        {"model_registry": str(registry), "relay_interval_seconds": 1.0},
    )
    deployment.setup()
    deployment.start("beat")
    worker = deployment.start("worker")
    yield deployment
    deployment.kill(worker, signal.SIGTERM)
    deployment.stop_all()


@pytest.fixture(scope="module")
def key(stack):
    return stack.team_key("classify")


def _upload(api, key, name, content):
    response = api.post(
        "/files", headers=auth(key), files={"file": (name, content)}, data={"purpose": "fine-tune"}
    )
    assert response.status_code == 201, response.text
    return response.json()


def _run(api, key, stack, spec):
    return trained_job(stack, api, key, spec, timeout=240)


def _download(api, key, job_id, target):
    response = api.get(f"/jobs/{job_id}/artifacts/adapter.tar.gz", headers=auth(key))
    assert response.status_code == 200, response.text
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(target, filter="data")
    return target


def _reload_logits(output_dir, base_dir, texts):
    import torch
    from transformers import AutoTokenizer

    from peft_engine import load_trained

    model = load_trained(output_dir, base_dir).eval()
    encoded = AutoTokenizer.from_pretrained(output_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**encoded).logits


def test_classification_job_from_a_csv_file(stack, api, key, bert_dir, tmp_path):
    train = _upload(api, key, "reviews.csv", _reviews_csv(4))
    assert train["format"] == "classification"
    assert train["report"]["label_counts"] == {"negative": 32, "positive": 32}
    spec = {
        "model": "tiny-bert",
        "task": "seq_classification",
        "training_file": train["id"],
        "validation_split": 0.25,
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 8,
            "learning_rate": 5e-3,
            "eval_every_steps": 6,
            "early_stopping": None,
            "class_weights": "balanced",
        },
    }
    job = _run(api, key, stack, spec)
    assert job["hyperparameters"]["pooling"] == "pooler"  # a BertModel saved with its pooler
    result = job["result"]
    assert set(result["metrics"]["best"]) >= {"eval_loss", "accuracy", "macro_f1"}
    assert result["metrics"]["best"]["eval_loss"] < result["metrics"]["initial"]["eval_loss"]
    assert result["labels"] == ["negative", "positive"]
    report = result["report"]
    assert set(report["per_class"]) == {"negative", "positive"}
    matrix = report["confusion_matrix"]
    assert sum(map(sum, matrix)) == result["validation_examples"] == 16

    metrics = api.get(f"/jobs/{job['id']}/metrics", headers=auth(key)).json()
    assert [p["step"] for p in metrics["eval"]] == [0, 6, 12, 18]
    assert all({"accuracy", "macro_f1", "eval_loss"} <= set(p) for p in metrics["eval"])

    out = _download(api, key, job["id"], tmp_path / "out")
    assert (out / "adapter_config.json").is_file() and (out / "tuneq_model.json").is_file()
    logits = _reload_logits(out, bert_dir, ["the film was great", "the plot was awful"])
    assert logits.shape == (2, 2)


def test_ner_job_with_bottleneck_adapters(stack, api, key, bert_dir, tmp_path):
    train = _upload(api, key, "ner.jsonl", _sentences(48))
    assert train["format"] == "token_classification"
    assert train["report"]["entity_counts"] == {"LOC": 48, "PER": 96}
    validation = _upload(api, key, "ner-val.jsonl", _sentences(12))
    spec = {
        "model": "tiny-bert",
        "task": "token_classification",
        "training_file": train["id"],
        "validation_file": validation["id"],
        "method": {"type": "bottleneck_adapter", "bottleneck": 8},
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "eval_every_steps": 6,
            "early_stopping": None,
        },
    }
    job = _run(api, key, stack, spec)
    result = job["result"]
    best = result["metrics"]["best"]
    assert {"entity_f1", "entity_precision", "entity_recall"} <= set(best)
    assert best["eval_loss"] < result["metrics"]["initial"]["eval_loss"]
    assert result["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert set(result["report"]["per_type"]) <= {"LOC", "PER"}

    metrics = api.get(f"/jobs/{job['id']}/metrics", headers=auth(key)).json()
    assert all("entity_f1" in p for p in metrics["eval"])

    out = _download(api, key, job["id"], tmp_path / "out")
    assert (out / "trained_weights.safetensors").is_file()
    logits = _reload_logits(out, bert_dir, ["alice visited rome"])
    assert logits.shape[-1] == 5


def test_unsupported_pairs_are_refused_at_post_jobs(api, key):
    train = _upload(api, key, "reviews.csv", _reviews_csv(1))
    spec = {
        "model": "tiny-llama",
        "task": "causal_lm",
        "training_file": train["id"],
        "method": {"type": "head_only"},
    }
    response = api.post("/jobs", headers=auth(key), json=spec)
    assert response.status_code == 422, response.text
    problem = response.json()
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "head_only" in problem["detail"] and "causal_lm" in problem["detail"]
    assert problem["errors"][0]["field"] == "method.type"

    spec |= {"model": "tiny-bert", "task": "token_classification", "method": {"type": "lora"}}
    response = api.post("/jobs", headers=auth(key), json=spec)
    assert response.status_code == 422
    assert "token_classification" in response.json()["detail"]  # a CSV of labels, not tags
    assert response.json()["errors"][0]["field"] == "training_file"


def test_models_show_what_each_task_supports(api, key):
    models = {m["id"]: m for m in api.get("/models", headers=auth(key)).json()["data"]}
    bert = models["tiny-bert"]["support"]
    assert "head_only" in bert["seq_classification"] and "bitfit" in bert["token_classification"]
    llama = models["tiny-llama"]["support"]["causal_lm"]
    assert "bitfit" not in llama and "head_only" not in llama and "prefix_tuning" in llama
