"""`make demo`: the whole service on this machine, teaching a small model a visible habit.

It starts the embedded stack (API, worker, beat), uploads the demo chat data through the
HTTP API, trains a LoRA adapter on SmolLM2-135M-Instruct, follows the job with a progress
bar fed by the API's events, downloads the adapter through the API, and prints the base
and the tuned model's answers to questions the training data never asked. The dashboard
shows the same job as it trains; `--keep` leaves the stack up afterwards to look at it.

The data (`data/*.jsonl`, written for this demo, same licence as tuneq) answers everyday
questions as "Captain Tuneq", a pirate: every answer opens with "Arr, matey!" and ends
with "Yo ho ho!". A hundred-odd steps of LoRA are enough for the habit to show.
"""

from __future__ import annotations

import contextlib
import textwrap
import time
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

from peft_engine.progress import ConsoleProgress, format_duration
from tuneq.client import Client, Job, TuneqAPIError
from tuneq.client.client import ADAPTER
from tuneq.client.progress import draw_event
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


def run_demo(settings: Settings, *, keep: bool = False) -> int:
    """Run the demo; `keep` leaves the stack up at the end (to look at the job in the
    dashboard) instead of stopping it. Ctrl-C cancels the job and stops the stack."""
    started = time.monotonic()
    stack = EmbeddedStack.for_settings(settings)
    print(f"tuneq demo: starting the embedded stack under {stack.home}")
    stack.start()
    client = None
    job_id = None
    interrupted = False
    try:
        stack.wait_ready()
        key = local_key(settings, "demo")
        client = Client(stack.url, key)
        print(f"API ready at {stack.url} (docs: {stack.url}/docs); team 'demo', a new key")
        print(f"dashboard {stack.url}/ : watch the job there, signed in with the key {key}")
        job = _submit(client)
        job_id = job.id
        job = _follow(client, job_id)
        if job.status != "succeeded":
            print(f"\nthe job ended {job.status}: {job.error}")
            return 1
        adapter = _download(client, job_id, stack.home / "demo" / job_id)
        _compare(job, adapter, settings)
        print(f"\ndone in {format_duration(time.monotonic() - started)}")
        return 0
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: cancelling the job and stopping the stack")
        if client is not None and job_id is not None:
            _cancel(client, job_id)
        return 130
    finally:
        if client is not None:
            client.close()
        if keep and not interrupted:
            print(f"\nthe stack keeps running (--keep): dashboard {stack.url}/ , the job "
                  f"{stack.url}/#/jobs/{job_id}; `tuneq down` stops it")  # fmt: skip
        else:
            stopped = stack.stop()
            print(f"stopped {', '.join(stopped) or 'nothing'}; everything stays in {stack.home}:")
        print(f"  database  {settings.resolved_database_url.removeprefix('sqlite:///')}")
        print(f"  artifacts {settings.resolved_store_dir}")
        print(f"  logs      {stack.logs}")


def _cancel(client: Client, job_id: str) -> None:
    """Cancel the job and wait for the worker to stop it, so it ends `cancelled`."""
    with contextlib.suppress(TuneqAPIError):
        client.jobs.cancel(job_id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if client.jobs.get(job_id).status in ("cancelled", "failed"):
                return
            time.sleep(0.5)


def _submit(client: Client) -> Job:
    ids = {}
    for name in ("train", "validation"):
        with as_file(files("tuneq.demo") / "data" / f"{name}.jsonl") as path:
            ids[name] = uploaded = client.files.upload(path, filename=f"pirate-{name}.jsonl")
        print(f"uploaded {uploaded.filename}: {uploaded.examples} {uploaded.format} "
              f"examples ({uploaded.id})")  # fmt: skip
    spec = SPEC | {"training_file": ids["train"].id, "validation_file": ids["validation"].id}
    job = client.jobs.create(spec)
    estimate = job.estimate or {}
    how = "" if estimate["tokens_exact"] else " (guessed from characters until the model is cached)"
    print(
        f"created {job.id}: LoRA r=16 on {MODEL}, {estimate['total_steps']} steps, "
        f"~{estimate['trained_tokens']:,} tokens{how}"
    )
    return job


def _follow(client: Client, job_id: str) -> Job:
    """Draw the job's progress from its events until it ends."""
    progress = ConsoleProgress()
    following = client.jobs.follow(job_id)
    for event in following:
        draw_event(progress, event)
    assert following.job is not None  # the events end only once the job has
    return following.job


def _download(client: Client, job_id: str, target: Path) -> Path:
    adapter = client.jobs.download(job_id, out=target / "adapter")
    size = next(a.bytes for a in client.jobs.artifacts(job_id) if a.name == ADAPTER)
    print(f"downloaded the adapter ({size / 1e6:.1f} MB) to {adapter}")
    return adapter


def _compare(job: Job, adapter: Path, settings: Settings) -> None:
    from peft_engine.generate import Answerer
    from peft_engine.models import load_registry
    from peft_engine.progress import quiet_library_output

    quiet_library_output()

    result = job.result or {}
    metrics = result["metrics"]
    before, after = metrics["initial"]["eval_loss"], metrics["best"]["eval_loss"]
    print(
        f"\neval loss on the held-out validation file: {before:.3f} (base model) -> "
        f"{after:.3f} (tuned, step {result['best_step']})"
    )
    answerer = Answerer(
        MODEL,
        adapter,
        registry=load_registry(settings.resolved_model_registry),
        cache_dir=settings.resolved_cache_dir,
    )
    width = 46
    print("\nQuestions the training data never asked, answered greedily:\n")
    print(f"{'base model':<{width}} | tuned ({job.id})")
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
