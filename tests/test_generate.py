"""`POST /jobs/{id}/generate` on a whole deployment: the API, a `tuneq worker` and beat.

Tiny models train real adapters (a chat LoRA on a tiny Llama, a sentiment and an NER LoRA
on a tiny BERT); then the worker answers with them, and its answers are the ones the
downloaded artifacts give when loaded here. Bad requests get problem+json naming the field,
and with no worker left on the inference queue a request gets a 503. Two deployments run
the same tests: embedded (SQLite, filesystem broker and results, local store) and
production (PostgreSQL, Redis, S3 over HTTP).
"""

from __future__ import annotations

import io
import json
import signal
import tarfile

import httpx
import pytest

from tests.api_helpers import assert_problem, job_spec, jsonl
from tests.conftest import build_tiny_bert, chat
from tests.service_fixtures import api_client, auth, make_settings
from tests.stack import running_stack, trained_job

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
SENTIMENT = {"great": "positive", "good": "positive", "awful": "negative", "bad": "negative"}
PEOPLE, PLACES = ("alice", "bob", "carol", "dave"), ("paris", "rome", "berlin", "oslo")
MAX_INPUT_CHARS, MAX_INPUT_TOKENS, MAX_NEW_TOKENS = 2000, 64, 12


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module", params=["embedded", "production"])
def stack(request, tmp_path_factory, tiny_model_dir, bert_dir):
    home = tmp_path_factory.mktemp(f"generate-{request.param}")
    llama = {"source": {"type": "local", "path": str(tiny_model_dir)}, "tasks": ["causal_lm"]}
    bert = {"source": {"type": "local", "path": str(bert_dir)}, "family": "bert"}
    registry = home / "models.json"
    models = {
        "tiny-llama": llama,
        "tiny-llama-parked": llama | {"queue": "parked"},  # no worker trains it: stays queued
        "tiny-bert": bert | {"tasks": ["seq_classification", "token_classification"]},
    }
    registry.write_text(json.dumps({"models": models}))
    overrides = {
        "model_registry": str(registry),
        "relay_interval_seconds": 1.0,
        "generate_wait_seconds": 60.0,  # the worker is idle: it takes requests at once
        "generate_max_input_chars": MAX_INPUT_CHARS,
        "generate_max_input_tokens": MAX_INPUT_TOKENS,
        "generate_max_new_tokens": MAX_NEW_TOKENS,
    }
    with running_stack(request.param, home, overrides) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def key(stack):
    return stack.team_key("try-it")


def _train(api, key, stack, name, content, spec):
    uploaded = api.post("/files", headers=auth(key), files={"file": (name, content)})
    assert uploaded.status_code == 201, uploaded.text
    return trained_job(stack, api, key, spec | {"training_file": uploaded.json()["id"]})["id"]


@pytest.fixture(scope="module")
def chat_job(stack, worker, api, key):
    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    spec = job_spec("")
    spec["hyperparameters"] |= {"learning_rate": 0.01, "checkpoint_every_steps": 2}
    return _train(api, key, stack, "chat.jsonl", jsonl(rows), spec)


@pytest.fixture(scope="module")
def sentiment_job(stack, worker, api, key):
    rows = [
        {"text": f"the {noun} was {word}", "label": label}
        for noun in ("film", "movie", "plot", "a film")
        for word, label in SENTIMENT.items()
    ]
    spec = {
        "model": "tiny-bert",
        "task": "seq_classification",
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 5e-3},
    }
    return _train(api, key, stack, "reviews.jsonl", jsonl(rows * 2), spec)


@pytest.fixture(scope="module")
def ner_job(stack, worker, api, key):
    rows = [
        {
            "tokens": [PEOPLE[i % 4], "visited", PLACES[i % 3], "and", "saw", PEOPLE[(i + 1) % 4]],
            "tags": ["B-PER", "O", "B-LOC", "O", "O", "B-PER"],
        }
        for i in range(24)
    ]
    spec = {
        "model": "tiny-bert",
        "task": "token_classification",
        "method": {"type": "lora", "r": 4, "alpha": 8},
        "hyperparameters": {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-2},
    }
    return _train(api, key, stack, "ner.jsonl", jsonl(rows), spec)


def _generate(api, key, job_id, **body):
    return api.post(f"/jobs/{job_id}/generate", headers=auth(key), json=body)


def _download(api, key, job_id, name, target):
    url = f"/jobs/{job_id}/artifacts/{name}"
    response = api.get(url, headers=auth(key), follow_redirects=False)
    if response.status_code == 307:  # S3: a presigned URL, fetched without our key
        response = httpx.get(response.headers["location"])
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(target, filter="data")
    return target


def _loaded_here(api, key, job_id, name, base_dir, tmp_path):
    """The artifact as a user loads it after downloading it: the reference answers."""
    from peft_engine.generate import TrainedModel

    return TrainedModel(_download(api, key, job_id, name, tmp_path / name), base_dir)


def test_a_chat_adapter_answers_as_it_does_when_downloaded(
    api, key, chat_job, tiny_model_dir, tmp_path
):
    response = _generate(api, key, chat_job, messages=QUESTION, max_new_tokens=8)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "job.generation" and answer["job_id"] == chat_job
    assert answer["task"] == "causal_lm" and answer["checkpoint"] is None
    assert answer["message"]["role"] == "assistant"
    assert answer["finish_reason"] in {"stop", "length"}
    assert answer["usage"]["input_tokens"] > 0 and 0 < answer["usage"]["output_tokens"] <= 8

    here = _loaded_here(api, key, chat_job, "adapter.tar.gz", tiny_model_dir, tmp_path)
    expected = here.reply(QUESTION, max_new_tokens=8, max_input_tokens=MAX_INPUT_TOKENS)
    assert answer["message"]["content"] == expected.content
    assert answer["usage"]["output_tokens"] == expected.output_tokens

    again = _generate(api, key, chat_job, messages=QUESTION, max_new_tokens=8)
    assert again.json() == answer  # greedy: the same answer, from the model kept loaded

    # a prompt continued as it stands (no chat template), as a prompt/completion job wants
    response = _generate(api, key, chat_job, prompt="What is 3 plus 3?", max_new_tokens=8)
    assert response.status_code == 200, response.text
    expected = here.complete("What is 3 plus 3?", max_new_tokens=8, max_input_tokens=64)
    assert response.json()["message"]["content"] == expected.content
    assert response.json()["usage"]["input_tokens"] == expected.input_tokens

    # a checkpoint answers too, as its own download does
    response = _generate(api, key, chat_job, messages=QUESTION, checkpoint=2)
    assert response.status_code == 200, response.text
    assert response.json()["checkpoint"] == 2
    here = _loaded_here(api, key, chat_job, "checkpoint-2.tar.gz", tiny_model_dir, tmp_path)
    expected = here.reply(QUESTION, max_new_tokens=MAX_NEW_TOKENS, max_input_tokens=64)
    assert response.json()["message"]["content"] == expected.content


def test_a_classifier_answers_a_label_with_scores(api, key, sentiment_job, bert_dir, tmp_path):
    response = _generate(api, key, sentiment_job, text="the movie was great")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["task"] == "seq_classification"
    assert set(answer["scores"]) == {"negative", "positive"}
    assert answer["label"] == max(answer["scores"], key=answer["scores"].get)
    assert sum(answer["scores"].values()) == pytest.approx(1.0, abs=1e-4)

    here = _loaded_here(api, key, sentiment_job, "adapter.tar.gz", bert_dir, tmp_path)
    expected = here.classify("the movie was great", None, max_input_tokens=MAX_INPUT_TOKENS)
    assert answer["label"] == expected.label
    assert answer["scores"] == pytest.approx(expected.scores, abs=1e-5)


def test_a_tagger_answers_a_tag_per_word(api, key, ner_job, bert_dir, tmp_path):
    words = ["bob", "visited", "rome"]
    response = _generate(api, key, ner_job, tokens=words)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["task"] == "token_classification"
    assert [t["token"] for t in answer["tokens"]] == words
    assert {t["tag"] for t in answer["tokens"]} <= {"O", "B-LOC", "I-LOC", "B-PER", "I-PER"}

    here = _loaded_here(api, key, ner_job, "adapter.tar.gz", bert_dir, tmp_path)
    expected = here.tag(words, max_input_tokens=MAX_INPUT_TOKENS)
    assert [t["tag"] for t in answer["tokens"]] == [w.tag for w in expected.words]
    # a sentence as text is split into the same words
    assert _generate(api, key, ner_job, text=" bob  visited rome ").json() == answer


def test_bad_requests_are_problems_naming_the_field(stack, api, key, chat_job, sentiment_job):
    long = "word " * (MAX_INPUT_CHARS // 5 + 1)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long}]
    problem = assert_problem(_generate(api, key, chat_job, messages=messages), 422)
    assert problem["errors"][0]["field"] == "messages[1].content"
    # within the characters, over the tokens: the worker refuses it, naming the field
    problem = assert_problem(
        _generate(api, key, chat_job, messages=[{"role": "user", "content": "seven " * 80}]), 422
    )
    assert problem["errors"][0]["field"] == "messages" and "tokens" in problem["detail"]

    cases = [
        (chat_job, {"text": "hello"}, "text"),  # not what a causal_lm job takes
        (chat_job, {"messages": []}, "messages"),
        (chat_job, {"messages": QUESTION, "prompt": "and"}, "messages"),  # one, not both
        (chat_job, {"prompt": "  "}, "prompt"),
        (chat_job, {"prompt": "seven " * 3000}, "prompt"),  # over the characters allowed
        (sentiment_job, {"prompt": "the film"}, "prompt"),
        (chat_job, {"messages": QUESTION, "max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
        (chat_job, {"messages": QUESTION, "checkpoint": 999}, "checkpoint"),
        (chat_job, {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (sentiment_job, {"messages": QUESTION}, "messages"),
        (sentiment_job, {"text": "fine", "surprise": 1}, "surprise"),
    ]
    for job_id, body, field in cases:
        problem = assert_problem(_generate(api, key, job_id, **body), 422)
        assert problem["errors"][0]["field"] == field, (body, problem)

    # another team's job does not exist for you
    other = stack.team_key("someone-else")
    assert_problem(_generate(api, other, chat_job, messages=QUESTION), 404)

    # a job with no adapter yet: nothing to answer with
    uploaded = api.post(
        "/files", headers=auth(key), files={"file": ("c.jsonl", jsonl([chat("a", "b")] * 8))}
    )
    parked = api.post(
        "/jobs", headers=auth(key), json=job_spec(uploaded.json()["id"], model="tiny-llama-parked")
    )
    assert parked.status_code == 201, parked.text
    problem = assert_problem(_generate(api, key, parked.json()["id"], messages=QUESTION), 409)
    assert problem["code"] == "adapter_not_ready" and "queued" in problem["detail"]


def test_the_schema_documents_each_answer(api):
    operation = api.get("/openapi.json").json()["paths"]["/jobs/{job_id}/generate"]["post"]
    answers = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in answers["oneOf"]} == {
        "ChatGeneration",
        "LabelGeneration",
        "TagGeneration",
    }
    assert {"404", "409", "422", "503"} <= set(operation["responses"])


def test_with_no_worker_on_the_inference_queue_a_request_is_a_503(stack, worker, key, chat_job):
    stack.kill(worker, signal.SIGTERM)  # the last test of the module: no worker from here on
    settings = make_settings(stack.home, **(stack.overrides | {"generate_wait_seconds": 2.0}))
    with api_client(settings) as client:
        response = _generate(client, key, chat_job, messages=QUESTION)
    problem = assert_problem(response, 503)
    assert problem["code"] == "inference_unavailable"
    assert "'training-inference'" in problem["detail"]
