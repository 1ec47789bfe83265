"""An embedded tuneq deployment on tiny models, seeded with jobs of each task, for the
dashboard's browser tests (tests/test_dashboard_browser.py) and for a person to look at:

    .venv/bin/python -m tests.dashboard_stack /tmp/tuneq-ui     # prints the URL and a key

It runs `tuneq up` (API, worker and beat as real processes on SQLite, the filesystem broker
and the local store), so the page talks to a real API over HTTP.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import (
    build_tiny_bert,
    build_tiny_llama,
    build_tiny_tokenizer,
    chat,
    local_model,
    write_registry,
)
from tests.service_fixtures import auth, run_cli

# Text a careless page would run as HTML, in a file's name, a label and a job's metadata: the
# page must show each as text.
HOSTILE_NAME = "<img src=x onerror=window.__xss=1>.jsonl"
HOSTILE_LABEL = "<img src=x onerror=window.__xss=2>"
HOSTILE_NOTE = "<script>window.__xss=3</script>"
SENTIMENT = {"good": "positive", "great": "positive", "awful": HOSTILE_LABEL, "bad": HOSTILE_LABEL}
REVIEWS = [
    {"text": f"the {noun} was {word}", "label": label}
    for noun in ("film", "movie", "plot", "story")
    for word, label in SENTIMENT.items()
]
SENTENCES = [
    {"tokens": words.split(), "tags": tags.split()}
    for words, tags in (
        ("alice visited paris", "B-PER O B-LOC"),
        ("bob saw rome and carol", "B-PER O B-LOC O B-PER"),
        ("dave met alice in oslo", "B-PER O B-PER O B-LOC"),
        ("carol visited berlin", "B-PER O B-LOC"),
    )
] * 3
COLOURS = ("red", "blue", "green", "gold")
CHATS = [chat(f"say {word}", f"{word} {word}") for word in COLOURS] * 6
PROMPTS = [{"prompt": f"say {word}:", "completion": f" {word} {word}"} for word in COLOURS] * 6


@dataclass
class DashboardStack:
    home: Path
    url: str
    key: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=auth(self.key), timeout=60)

    def other_team_key(self, team: str) -> str:
        """A key of another team, made as an operator makes one."""
        run_cli(self.home, "admin", "create-team", team, **self.env())
        made = run_cli(self.home, "admin", "create-key", "--team", team, **self.env())
        return made.stdout.strip().splitlines()[-1]

    def stop(self) -> None:
        run_cli(self.home, "down", **self.env())

    def env(self) -> dict[str, str]:
        return {
            "TUNEQ_MODEL_REGISTRY": str(self.home / "models.json"),
            "TUNEQ_CACHE_DIR": str(self.home / "cache"),
            # the failed job crashes its only attempt (tuneq/faults.py's hook)
            "TUNEQ_FAULTS": "{}",
            "TUNEQ_MAX_ATTEMPTS": "1",
        }


def tiny_registry(home: Path) -> Path:
    models = home / "models"
    llama = models / "tiny-llama"
    llama.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(llama)
    build_tiny_llama(llama, vocab_size=len(tokenizer))
    bert = build_tiny_bert(models / "tiny-bert")
    llama_entry = local_model(llama, "llama", ["causal_lm"])
    bert_entry = local_model(bert, "bert", ["seq_classification", "token_classification"])
    return write_registry(
        home / "models.json",
        {
            "tiny-llama": llama_entry | {"description": "tiny random Llama"},
            "tiny-bert": bert_entry | {"description": "tiny random BERT"},
        },
    )


def start(home: Path) -> DashboardStack:
    """Build the tiny models, start the stack, and return its URL and a key of team 'ui'."""
    home.mkdir(parents=True, exist_ok=True)
    tiny_registry(home)
    stack = DashboardStack(home, "", "")
    up = run_cli(home, "up", **stack.env())
    if up.returncode != 0:
        raise RuntimeError(f"tuneq up failed:\n{up.stdout}\n{up.stderr}")
    lines = dict(l.split("=", 1) for l in up.stdout.splitlines() if l.startswith("TUNEQ_"))  # noqa: E741
    stack.url, stack.key = lines["TUNEQ_URL"], lines["TUNEQ_API_KEY"]
    return stack


def upload(api: httpx.Client, name: str, rows: list[Any]) -> str:
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    answer = api.post("/files", files={"file": (name, body)}, data={"purpose": "fine-tune"})
    answer.raise_for_status()
    return answer.json()["id"]


def seed_jobs(stack: DashboardStack) -> dict[str, str]:
    """One finished job per task, each with checkpoints, and one failed job ("failed"):
    their ids by task."""
    with stack.api() as api:
        chats = upload(api, "chats.jsonl", CHATS)
        reviews = upload(api, "reviews.jsonl", REVIEWS)
        sentences = upload(api, HOSTILE_NAME, SENTENCES)
        hp = {"n_epochs": 3, "batch_size": 4, "eval_every_steps": 3, "checkpoint_every_steps": 6}
        specs = {
            "causal_lm": {"model": "tiny-llama", "task": "causal_lm", "training_file": chats,
                          "validation_split": 0.25, "suffix": "colours", "hyperparameters": hp},
            "seq_classification": {"model": "tiny-bert", "task": "seq_classification",
                                   "training_file": reviews, "validation_split": 0.25,
                                   "hyperparameters": hp | {"n_epochs": 4}},
            "token_classification": {"model": "tiny-bert", "task": "token_classification",
                                     "training_file": sentences, "validation_split": 0.25,
                                     "metadata": {"note": HOSTILE_NOTE}, "hyperparameters": hp},
        }  # fmt: skip
        specs["prompted"] = specs["causal_lm"] | {
            "training_file": upload(api, "prompts.jsonl", PROMPTS), "suffix": "prompted"
        }  # fmt: skip
        # One that fails in the worker: its only attempt crashes at its first step.
        specs["failed"] = specs["seq_classification"] | {
            "suffix": "doomed", "metadata": {"fault": "raise", "fault_step": "1"}
        }  # fmt: skip
        ids = {}
        for task, spec in specs.items():
            created = api.post("/jobs", json=spec)
            if created.status_code != 201:
                raise RuntimeError(f"{task} job refused: {created.text}")
            ids[task] = created.json()["id"]
        deadline = time.monotonic() + 600
        for task, job_id in ids.items():
            while (status := api.get(f"/jobs/{job_id}").json()["status"]) not in (
                "succeeded", "failed", "cancelled"
            ):  # fmt: skip
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {status}")
                time.sleep(0.5)
            if status != ("failed" if task == "failed" else "succeeded"):
                raise RuntimeError(f"job {job_id} {status}: {api.get(f'/jobs/{job_id}').json()}")
    return ids


if __name__ == "__main__":
    stack = start(Path(sys.argv[1]).resolve())
    print(json.dumps(seed_jobs(stack), indent=2))
    print(f"dashboard: {stack.url}/   key: {stack.key}")
    print(f"stop with: TUNEQ_HOME={stack.home} .venv/bin/tuneq down")
