"""Job latency: from `POST /jobs` to the first training step, cold and warm (issue 7).

    .venv/bin/python bench/job_latency.py                  # the README's table
    .venv/bin/python bench/job_latency.py --shapes embedded --no-baseline

Each shape is a whole deployment started here as real processes (`tuneq api`, `tuneq
worker`, `tuneq beat`, each as the CLI starts it):

- `embedded`: SQLite, the filesystem broker, a local artifact store;
- `pg_redis`: a fresh PostgreSQL database and a Redis database (found or started as the
  tests do, tests/infra.py), S3 over HTTP (moto's server, as in the tests).

On each, two identical jobs run one after the other on one worker: **cold** is the first
job after the worker started (and reported ready), **warm** the next one, on the same base
model. The job: SmolLM2-135M-Instruct (`smollm2-135m-instruct` from the registry), LoRA
with its defaults, 20 generated chat examples (10% held out, so the base model is
evaluated first, as by default), `--steps` steps of batch 4. The model's dequantised
safetensors come from TUNEQ_CACHE_DIR (default ./.tuneq/cache, as in the Makefile); when
they are missing, the GGUF file is dequantised once before anything starts, timed on its
own line and excluded from cold. Before each job the model's files are dropped from the OS
page cache (`posix_fadvise(DONTNEED)`; `--keep-page-cache` leaves them), so a load "from
disk" reads the disk, as on a node that has not just read them.

What is measured, per job, from the rows the worker writes (events and metrics carry the
worker's clock in microseconds; the bench's clock is the same machine's):

- `POST`: the `POST /jobs` round trip (validation, token estimate, outbox, relay);
- `→ claim`: from sending the POST to the worker's "attempt started" event (broker
  delivery, the claim, the job row read);
- `claim → train`: to the engine's first event (training file copied from the store);
- `prepare`: reading and tokenizing the data (the tokenizer load included);
- `model`: the base model ready, from disk or from memory (the worker's event says which);
- `method + eval`: the adapter applied, the optimizer built, the base model evaluated on
  the held-out examples;
- `first step`: the first optimizer step's own duration (`trained_tokens /
  tokens_per_second` of its metric); its start is the first metric's time minus that;
- `claim → step`: from the claim to the start of the first step (the issue's target:
  warm ≤ 3 s), and `POST → step`: from sending the POST to that start (the headline).

With the baseline (`--no-baseline` skips it), the embedded shape runs again on a worker
with `TUNEQ_RESIDENT_MODELS=0`: every job loads its base model and tokenizer from disk.
The figures are reported, never asserted. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.stack/infra: the deployments, started as the tests do

MODEL = "smollm2-135m-instruct"
EXAMPLES = 20
BATCH_SIZE = 4
TARGET_WARM_CLAIM_TO_STEP_S = 3.0
READY_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Timeline:
    """One job's marks, in seconds since its POST was sent."""

    post: float
    claimed: float
    training: float
    prepared: float
    model_ready: float
    model_source: str
    step_start: float
    step_seconds: float

    @property
    def claim_to_step(self) -> float:
        return self.step_start - self.claimed

    def row(self, shape: str, job: str) -> str:
        cells = [
            shape,
            job,
            f"{self.post:.2f}",
            f"{self.claimed:.2f}",
            f"{self.training - self.claimed:.2f}",
            f"{self.prepared - self.training:.2f}",
            f"{self.model_ready - self.prepared:.2f} ({self.model_source})",
            f"{self.step_start - self.model_ready:.2f}",
            f"{self.step_seconds:.2f}",
            f"**{self.claim_to_step:.2f}**",
            f"**{self.step_start:.2f}**",
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| shape | job | POST | → claim | claim → train | prepare | model | method + eval "
    "| first step | claim → step | POST → step |\n"
    "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"
)


@dataclass(frozen=True)
class ShapeResult:
    shape: str
    worker_ready: float  # from starting the worker process to Celery's "ready"
    cold: Timeline
    warm: Timeline


# ---------------------------------------------------------------------------------------
# The deployments
# ---------------------------------------------------------------------------------------


@contextmanager
def deployment(shape: str, work: Path, cache_dir: Path, **settings: Any) -> Iterator[Any]:
    """A migrated deployment of `shape` with its API and beat running (no worker yet)."""
    from tests.stack import Stack

    overrides: dict[str, Any] = {
        "cache_dir": str(cache_dir),
        "port": _free_port(),
        "lease_ttl_seconds": 30.0,  # the defaults, not the tests' short lease
        **settings,
    }
    cleanup = []
    try:
        if shape == "pg_redis":
            overrides |= _production_services(cleanup)
        stack = Stack(shape, work / shape, overrides)
        stack.setup()
        cleanup.append(stack.stop_all)
        stack.start("api")
        stack.start("beat")
        _wait_http(f"http://127.0.0.1:{overrides['port']}/readyz", stack, "api")
        yield stack
    finally:
        for step in reversed(cleanup):
            step()


def _production_services(cleanup: list[Any]) -> dict[str, Any]:
    import boto3

    from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, redis_url
    from tests.s3server import start_moto_server

    database = fresh_postgres_database(postgres_url())
    cleanup.append(lambda: drop_postgres_database(database))
    server, endpoint = start_moto_server()
    cleanup.append(server.stop)
    credentials = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials).create_bucket(
        Bucket="tuneq-bench"
    )
    return {
        "database_url": database,
        "broker_url": redis_url(),
        "store": "s3",
        "s3_endpoint_url": endpoint,
        "s3_bucket": "tuneq-bench",
        "s3_access_key_id": "bench",
        "s3_secret_access_key": "bench",
    }


def start_worker(stack: Any) -> float:
    """Start `tuneq worker`; seconds until Celery says it is ready to take jobs."""
    started = time.monotonic()
    process = stack.start("worker")
    deadline = started + READY_TIMEOUT_S
    while " ready." not in stack.log("worker"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not become ready:\n{stack.log('worker')[-3000:]}")
        time.sleep(0.05)
    return time.monotonic() - started


def _wait_http(url: str, stack: Any, name: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} never answered:\n{stack.log(name)[-3000:]}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------
# The jobs
# ---------------------------------------------------------------------------------------


def chat_lines(n: int, seed: int = 0) -> bytes:
    """`n` small chat examples (about 50 tokens each), the same every run."""
    rng = random.Random(seed)
    cities = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Hanoi", "Quito", "Perth"]
    rows = []
    for i in range(n):
        a, b, city = rng.randint(2, 99), rng.randint(2, 99), rng.choice(cities)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "You answer briefly and exactly."},
                    {"role": "user", "content": f"Ticket {i}: what is {a} times {b}?"},
                    {"role": "assistant", "content": f"{a} times {b} is {a * b}, from {city}."},
                ]
            }
        )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def run_shape(stack: Any, steps: int, evict: Path | None) -> ShapeResult:
    """Start the worker, then run the cold job and the warm one (each after evicting the
    model directory `evict` from the page cache, when given)."""
    ready = start_worker(stack)
    base = f"http://127.0.0.1:{stack.overrides['port']}"
    headers = {"Authorization": f"Bearer {stack.team_key('bench')}"}
    with httpx.Client(base_url=base, headers=headers, timeout=120) as api:
        upload = api.post(
            "/files",
            files={"file": ("chat.jsonl", chat_lines(EXAMPLES))},
            data={"purpose": "fine-tune"},
        )
        upload.raise_for_status()
        spec = {
            "model": MODEL,
            "training_file": upload.json()["id"],
            "method": {"type": "lora"},
            "hyperparameters": {
                "max_steps": steps,
                "batch_size": BATCH_SIZE,
                "eval_every_steps": steps,
                "checkpoint_every_steps": steps,
            },
        }
        lines = []
        for _ in range(2):
            if evict is not None:
                evict_from_page_cache(evict)
            lines.append(timeline(stack, run_job(api, spec)))
    cold, warm = lines
    return ShapeResult(stack.name, ready, cold, warm)


def run_job(api: httpx.Client, spec: dict[str, Any]) -> tuple[str, float, float]:
    """POST the job and wait for its end: (job id, POST sent, POST answered), wall clock."""
    sent = time.time()
    response = api.post("/jobs", json=spec)
    answered = time.time()
    response.raise_for_status()
    job_id = response.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := api.get(f"/jobs/{job_id}").json()["status"]) not in {
        "succeeded",
        "failed",
        "cancelled",
    }:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} still {status} after {JOB_TIMEOUT_S:.0f}s")
        time.sleep(0.5)
    if status != "succeeded":
        raise RuntimeError(f"job {job_id} {status}: {api.get(f'/jobs/{job_id}').json()['error']}")
    return job_id, sent, answered


def timeline(stack: Any, posted: tuple[str, float, float]) -> Timeline:
    """The job's marks, read from the events and metrics the worker recorded."""
    from sqlalchemy import select

    from tuneq.db import make_engine, make_sessionmaker
    from tuneq.jobs.models import JobEvent, JobMetric

    job_id, sent, answered = posted
    engine = make_engine(stack.settings.resolved_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            events = db.scalars(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            ).all()
            first = db.scalars(
                select(JobMetric)
                .where(JobMetric.job_id == job_id, JobMetric.kind == "train")
                .order_by(JobMetric.step)
            ).first()
    finally:
        engine.dispose()
    assert first is not None, f"job {job_id} has no train metric"

    def at(matches: Any) -> Any:
        event = next(e for e in events if matches(e))
        return event.created_at.timestamp() - sent, event

    claimed, _ = at(lambda e: e.message.startswith("attempt "))
    training, _ = at(lambda e: e.message.startswith("preparing "))
    prepared, _ = at(lambda e: "resolved_hyperparameters" in e.data)
    model_ready, loaded = at(lambda e: "base_model_source" in e.data)
    step_seconds = first.values["trained_tokens"] / first.values["tokens_per_second"]
    return Timeline(
        post=answered - sent,
        claimed=claimed,
        training=training,
        prepared=prepared,
        model_ready=model_ready,
        model_source=loaded.data["base_model_source"],
        step_start=first.created_at.timestamp() - sent - step_seconds,
        step_seconds=step_seconds,
    )


# ---------------------------------------------------------------------------------------
# The model files
# ---------------------------------------------------------------------------------------


DEQUANTISE = """
import json, sys, time
from pathlib import Path
from peft_engine.models import load_registry, model_dir
entry, cache = load_registry().get(sys.argv[1]), Path(sys.argv[2])
seconds = None
if model_dir(entry, cache, build=False) is None:
    started = time.monotonic()
    model_dir(entry, cache)
    seconds = time.monotonic() - started
print(json.dumps({"path": str(model_dir(entry, cache)), "seconds": seconds}))
"""


def ensure_dequantised(cache_dir: Path) -> tuple[Path, float | None]:
    """The model's directory, dequantised first if this cache lacks it (and how long that
    took; None when it was cached)."""
    done = subprocess.run(
        [sys.executable, "-c", DEQUANTISE, MODEL, str(cache_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return Path(found["path"]), found["seconds"]


def evict_from_page_cache(directory: Path) -> None:
    """Drop the directory's files from the OS page cache, so "from disk" reads the disk."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


def figures(results: list[ShapeResult], baseline: ShapeResult | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for result in results:
        for job, line in (("cold", result.cold), ("warm", result.warm)):
            prefix = f"{result.shape}_{job}"
            out[f"{prefix}_s"] = round(line.step_start, 3)
            out[f"{prefix}_claim_to_step_s"] = round(line.claim_to_step, 3)
            out[f"{prefix}_model_s"] = round(line.model_ready - line.prepared, 3)
        out[f"{result.shape}_worker_ready_s"] = round(result.worker_ready, 3)
    if baseline is not None:
        out["embedded_no_resident_warm_s"] = round(baseline.warm.step_start, 3)
        out["embedded_no_resident_warm_claim_to_step_s"] = round(baseline.warm.claim_to_step, 3)
        out["embedded_no_resident_warm_model_s"] = round(
            baseline.warm.model_ready - baseline.warm.prepared, 3
        )
    out["target_warm_claim_to_step_s"] = TARGET_WARM_CLAIM_TO_STEP_S
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="embedded,pg_redis", help="embedded,pg_redis")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per job")
    parser.add_argument(
        "--keep-page-cache",
        action="store_true",
        help="leave the model's files in the OS page cache between jobs (default: evict them)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the embedded run with the resident cache off (TUNEQ_RESIDENT_MODELS=0)",
    )
    args = parser.parse_args()
    cache_dir = Path(os.environ.get("TUNEQ_CACHE_DIR", ROOT / ".tuneq" / "cache")).resolve()

    model_path, dequantised = ensure_dequantised(cache_dir)
    evict = None if args.keep_page_cache else model_path
    results, baseline = [], None
    with tempfile.TemporaryDirectory(prefix="tuneq-job-latency-") as work:
        for shape in args.shapes.split(","):
            with deployment(shape, Path(work), cache_dir) as stack:
                results.append(run_shape(stack, args.steps, evict))
        if not args.no_baseline:
            off = Path(work) / "no-resident"
            with deployment("embedded", off, cache_dir, resident_models=0) as stack:
                baseline = run_shape(stack, args.steps, evict)

    print(f"\n{MODEL}, LoRA defaults, {EXAMPLES} chat examples, batch {BATCH_SIZE}; seconds")
    cache = "kept" if evict is None else "evicted before each job"
    print(f"(model files in {model_path}, page cache {cache})")
    if dequantised is None:
        print("(dequantised weights already cached)")
    else:
        print(f"(first use: the GGUF file dequantised in {dequantised:.1f}s, not counted below)")
    print(HEADER)
    for result in results:
        print(result.cold.row(result.shape, "cold"))
        print(result.warm.row(result.shape, "warm"))
    if baseline is not None:
        print(baseline.cold.row("embedded, no resident cache", "cold"))
        print(baseline.warm.row("embedded, no resident cache", "warm"))
    ready = ", ".join(f"{r.shape} {r.worker_ready:.1f}s" for r in results)
    print(f"\nworker start → ready (imports torch, transformers, peft before taking jobs): {ready}")
    print(f"target: warm claim → first step ≤ {TARGET_WARM_CLAIM_TO_STEP_S:.0f}s")
    report = figures(results, baseline)
    report["dequantise_s"] = None if dequantised is None else round(dequantised, 1)
    report["page_cache_evicted"] = evict is not None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
