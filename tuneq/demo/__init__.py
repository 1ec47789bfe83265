"""`make demo`: the whole service on this machine, teaching a small model a visible habit.

It starts the embedded stack (API, worker, beat), uploads the demo chat data through the
HTTP API, trains a LoRA adapter on SmolLM2-135M-Instruct, follows the job with a progress
bar fed by the API's events, downloads the adapter through the API, and prints the base
and the tuned model's answers to questions the training data never asked.

The data (`data/*.jsonl`, written for this demo, same licence as tuneq) answers everyday
questions as "Captain Tuneq", a pirate: every answer opens with "Arr, matey!" and ends
with "Yo ho ho!". A hundred-odd steps of LoRA are enough for the habit to show.
"""

from __future__ import annotations

import contextlib
import io
import tarfile
import textwrap
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx

from peft_engine.hooks import Event
from peft_engine.progress import ConsoleProgress, format_duration
from tuneq.embedded import EmbeddedStack, local_key
from tuneq.settings import Settings

MODEL = "smollm2-135m-instruct"
HELD_OUT = (
    "What is the capital of Portugal?",
    "How many weeks are in a year?",
    "Give me a tip for sleeping better.",
    "What is the smallest planet in the solar system?",
)
SPEC: dict[str, Any] = {
    "model": MODEL,
    "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
    "hyperparameters": {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate": 0.001,
        "warmup_ratio": 0.1,
        "max_seq_length": 256,
        "eval_every_steps": 8,
        "checkpoint_every_steps": 8,
        "early_stopping": None,
    },
    "suffix": "captain-tuneq",
    "metadata": {"purpose": "demo"},
}


def run_demo(settings: Settings) -> int:
    started = time.monotonic()
    stack = EmbeddedStack.for_settings(settings)
    print(f"tuneq demo: starting the embedded stack under {stack.home}")
    stack.start()
    client = None
    job_id = None
    try:
        stack.wait_ready()
        key = local_key(settings, "demo")
        client = httpx.Client(
            base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
        )
        print(f"API ready at {stack.url} (docs: {stack.url}/docs); team 'demo', a new key")
        job = _submit(client)
        job_id = job["id"]
        job = _follow(client, job_id)
        if job["status"] != "succeeded":
            print(f"\nthe job ended {job['status']}: {job.get('error')}")
            return 1
        adapter = _download(client, job_id, stack.home / "demo" / job_id)
        _compare(job, adapter, settings)
        print(f"\ndone in {format_duration(time.monotonic() - started)}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: cancelling the job and stopping the stack")
        if client is not None and job_id is not None:
            _cancel(client, job_id)
        return 130
    finally:
        if client is not None:
            client.close()
        stopped = stack.stop()
        print(f"stopped {', '.join(stopped) or 'nothing'}; everything stays in {stack.home}:")
        print(f"  database  {settings.resolved_database_url.removeprefix('sqlite:///')}")
        print(f"  artifacts {settings.resolved_store_dir}")
        print(f"  logs      {stack.logs}")


def _cancel(client: httpx.Client, job_id: str) -> None:
    """Cancel the job and wait for the worker to stop it, so it ends `cancelled`."""
    with contextlib.suppress(httpx.HTTPError):
        client.post(f"/jobs/{job_id}/cancel")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if client.get(f"/jobs/{job_id}").json()["status"] in ("cancelled", "failed"):
                return
            time.sleep(0.5)


def _submit(client: httpx.Client) -> dict[str, Any]:
    data = files("tuneq.demo") / "data"
    ids = {}
    for name in ("train", "validation"):
        content = (data / f"{name}.jsonl").read_bytes()
        response = client.post("/files", files={"file": (f"pirate-{name}.jsonl", content)})
        response.raise_for_status()
        ids[name] = uploaded = response.json()
        print(f"uploaded {uploaded['filename']}: {uploaded['examples']} {uploaded['format']} "
              f"examples ({uploaded['id']})")  # fmt: skip
    spec = SPEC | {"training_file": ids["train"]["id"], "validation_file": ids["validation"]["id"]}
    response = client.post("/jobs", json=spec)
    response.raise_for_status()
    job = response.json()
    estimate = job["estimate"]
    how = "" if estimate["tokens_exact"] else " (guessed from characters until the model is cached)"
    print(
        f"created {job['id']}: LoRA r=16 on {MODEL}, {estimate['total_steps']} steps, "
        f"~{estimate['trained_tokens']:,} tokens{how}"
    )
    return job


def _follow(client: httpx.Client, job_id: str) -> dict[str, Any]:
    """Draw the job's progress from its events until it ends."""
    progress = ConsoleProgress()
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100} | ({"after": after} if after is not None else {})
        page = client.get(f"/jobs/{job_id}/events", params=params).json()
        for event in page["data"]:
            after = event["id"]
            if event["type"] == "metrics":
                progress.on_metrics(event["data"]["step"], event["data"])
            else:
                progress.on_event(Event(event["level"], event["message"]))
        if page["has_more"]:
            continue
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)


def _download(client: httpx.Client, job_id: str, target: Path) -> Path:
    response = client.get(f"/jobs/{job_id}/artifacts/adapter.tar.gz", follow_redirects=True)
    response.raise_for_status()
    adapter = target / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as archive:
        archive.extractall(adapter, filter="data")
    print(f"downloaded the adapter ({len(response.content) / 1e6:.1f} MB) to {adapter}")
    return adapter


def _compare(job: dict[str, Any], adapter: Path, settings: Settings) -> None:
    from peft_engine.generate import Answerer
    from peft_engine.models import load_registry
    from peft_engine.progress import quiet_library_output

    quiet_library_output()

    metrics = job["result"]["metrics"]
    before, after = metrics["initial"]["eval_loss"], metrics["best"]["eval_loss"]
    print(
        f"\neval loss on the held-out validation file: {before:.3f} (base model) -> "
        f"{after:.3f} (tuned, step {job['result']['best_step']})"
    )
    answerer = Answerer(
        MODEL,
        adapter,
        registry=load_registry(settings.model_registry),
        cache_dir=settings.resolved_cache_dir,
    )
    width = 46
    print("\nQuestions the training data never asked, answered greedily:\n")
    print(f"{'base model':<{width}} | tuned ({job['id']})")
    print(f"{'-' * width}-+-{'-' * width}")
    for prompt in HELD_OUT:
        base = textwrap.wrap(answerer.answer(prompt, tuned=False), width)
        tuned = textwrap.wrap(answerer.answer(prompt, tuned=True), width)
        print(f"Q: {prompt}")
        for i in range(max(len(base), len(tuned))):
            left = base[i] if i < len(base) else ""
            right = tuned[i] if i < len(tuned) else ""
            print(f"{left:<{width}} | {right}")
        print()
