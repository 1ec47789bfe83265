"""API load: job reads under 50 concurrent clients against a bare FastAPI endpoint, and a
1 GB dataset upload (issue 7).

    .venv/bin/python bench/api_load.py                     # the README's tables
    .venv/bin/python bench/api_load.py --duration 5 --upload-mb 200 --shapes postgresql

Each server runs in its own process, started as `tuneq api` starts it (uvicorn, through
`tuneq.cli.serve_http`, the same settings for all):

- the bare baseline: a FastAPI app whose `GET /jobs/{id}` and `GET /jobs?limit=20` return
  the documents tuneq returned for the same requests, already parsed, as `JSONResponse`
  (json.dumps, no response model): no auth, no database, no validation;
- tuneq on the production shape: a fresh PostgreSQL database (found or started as the
  tests do, tests/infra.py), Redis as the broker, a local store; and on the embedded
  shape (SQLite) unless `--shapes` leaves it out.

Each read phase is `--clients` keep-alive connections for `--duration` seconds after a
short warm-up, by `wrk` with one thread (so at most one of the machine's cores; its
latency percentiles come from a Lua `done` hook) or, where wrk is not installed, by an
asyncio HTTP/1.1 client in this process (also one core). The table says which, and how
much of its core the load generator used, so a saturated generator cannot pass unseen.

The upload generates valid chat JSONL of `--upload-mb` MB (10^6 bytes) in a temporary
file and sends it as one multipart `POST /files` with `sendfile` (the client costs next to
no CPU); it reports MB/s from the first byte sent to the response, and the API process's
resident memory before the upload and at its peak during it (/proc/<pid>/status, sampled,
and VmHWM). The target is reported, never asserted: reads at >= 50% of the bare
endpoint's throughput with p99 < 25 ms, uploads >= 100 MB/s with < 100 MB growth. The
last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.infra: PostgreSQL and Redis found or started as in tests

JOBS = 60  # more than one page of 20, so the list says has_more
WARMUP_SECONDS = 2.0
MB = 1_000_000
TARGET_RATIO, TARGET_P99_MS = 0.5, 25.0
TARGET_UPLOAD_MB_S, TARGET_GROWTH_MB = 100.0, 100.0

# A job spec as a user sends it (DESIGN §5); stored and shown the way POST /jobs would.
SPEC: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "task": "causal_lm",
    "training_file": "file-placeholder",
    "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
    "hyperparameters": {"n_epochs": 3, "batch_size": 8, "learning_rate": 0.0002},
    "suffix": "support-bot",
    "metadata": {"team": "search", "ticket": "ENG-1234"},
}

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK_RESULT %d %d %d %d %d %d\\n", summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


# ----------------------------------------------------------------------------- servers


class Server:
    """A server in its own process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = _free_port()
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*argv, "--port", str(self.port)], env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: see {self.log}\n{self.log.read_text()}")
            try:
                if http_get(self.port, "/healthz")[0] == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer /healthz in {timeout:.0f} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve_bare(docs_path: Path, port: int) -> None:
    """The baseline: FastAPI returning fixed documents, served as `tuneq api` is served."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from tuneq.cli import serve_http

    docs = json.loads(docs_path.read_text())
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> JSONResponse:
        return JSONResponse(docs["get"])

    @app.get("/jobs")
    async def list_jobs(limit: int = 20) -> JSONResponse:
        return JSONResponse(docs["list"])

    serve_http(app, host="127.0.0.1", port=port)


def tuneq_env(home: Path, **settings: str) -> dict[str, str]:
    """This environment without the caller's TUNEQ_* settings, plus the deployment's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQ_")}
    env["TUNEQ_HOME"] = str(home)
    env |= {f"TUNEQ_{name.upper()}": value for name, value in settings.items()}
    return env


# ----------------------------------------------------------------------------- deployments


@dataclass
class Deployment:
    shape: str  # "postgresql" or "sqlite"
    home: Path
    env: dict[str, str]
    key: str
    job_ids: list[str]


@contextmanager
def deployment(shape: str, work: Path) -> Iterator[Deployment]:
    """A migrated database with a team, an API key and JOBS queued jobs."""
    from tests.infra import (
        drop_postgres_database,
        fresh_postgres_database,
        postgres_url,
        redis_url,
    )

    home = work / shape
    home.mkdir()
    # A rate limit no run reaches: the limiter's cost (a Redis round trip per request on
    # the production shape) is measured, its refusals are not.
    settings: dict[str, str] = {"rate_limit_per_second": "1e9", "rate_limit_burst": "1000000000"}
    if shape == "postgresql":
        settings["database_url"] = fresh_postgres_database(postgres_url())
        settings["broker_url"] = redis_url()
    else:
        settings["database_url"] = f"sqlite:///{home / 'tuneq.db'}"
    try:
        key, job_ids = seed(settings["database_url"])
        yield Deployment(shape, home, tuneq_env(home, **settings), key, job_ids)
    finally:
        if shape == "postgresql":
            drop_postgres_database(settings["database_url"])


def seed(database_url: str) -> tuple[str, list[str]]:
    """Migrate, then add a team, its key and the jobs the readers read (no worker needed:
    queued jobs are rows like any other)."""
    from peft_engine.spec import parse_spec
    from tuneq.db import make_engine, make_sessionmaker, transaction
    from tuneq.ids import new_id
    from tuneq.jobs.models import Job
    from tuneq.migrate import upgrade
    from tuneq.teams.service import create_key, create_team

    upgrade(database_url)
    parsed = parse_spec(SPEC).model_dump(mode="json")
    resolved = {"method": parsed["method"], "hyperparameters": parsed["hyperparameters"]}
    estimate = {"examples": 1500, "trained_tokens": 1_260_000, "total_steps": 563}
    estimate |= {"duration_seconds": 12600.0, "tokens_per_second": 100.0}
    engine = make_engine(database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            team = create_team(db=db, name="bench")
            _, key = create_key(db=db, team=team)
            jobs = [
                Job(
                    id=new_id("job"),
                    team_id=team.id,
                    state="queued",
                    model=SPEC["model"],
                    queue="training",
                    task=SPEC["task"],
                    training_file_id=new_id("file"),
                    spec=SPEC,
                    resolved=resolved,
                    estimate=estimate,
                    suffix=SPEC["suffix"],
                    metadata_=SPEC["metadata"] | {"run": str(i)},
                    max_attempts=3,
                    progress={"step": 0, "total_steps": 563, "epoch": 0.0, "percent": 0.0},
                )
                for i in range(JOBS)
            ]
            db.add_all(jobs)
            ids = [job.id for job in jobs]
    finally:
        engine.dispose()
    return key, ids


# ----------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors and non-2xx responses
    loader_cpu: float  # share of one core the load generator used
    server_cpu: float  # share of one core the server process used


def run_load(
    server: Server, path: str, headers: dict[str, str], *, clients: int, duration: float
) -> LoadResult:
    """Warm up, then `clients` keep-alive connections for `duration` seconds."""
    loader = wrk_load if shutil.which("wrk") else python_load
    loader(server.port, path, headers, clients=clients, duration=WARMUP_SECONDS)
    cpu_before, server_before = _own_cpu(), server.cpu_seconds()
    started = time.perf_counter()
    requests, seconds, errors, p50, p99 = loader(
        server.port, path, headers, clients=clients, duration=duration
    )
    wall = time.perf_counter() - started
    return LoadResult(
        requests_per_s=requests / seconds,
        p50_ms=p50,
        p99_ms=p99,
        errors=errors,
        loader_cpu=(_own_cpu() - cpu_before) / wall,
        server_cpu=(server.cpu_seconds() - server_before) / wall,
    )


def loader_name() -> str:
    return "wrk -t1" if shutil.which("wrk") else "asyncio HTTP/1.1 client (wrk not installed)"


LoadFigures = tuple[int, float, int, float, float]  # requests, seconds, errors, p50, p99 (ms)


def wrk_load(
    port: int, path: str, headers: dict[str, str], *, clients: int, duration: float
) -> LoadFigures:
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()
        argv = ["wrk", "-t1", f"-c{clients}", f"-d{duration:g}s", "--timeout", "10s"]
        argv += ["-s", script.name, *(f for k, v in headers.items() for f in ("-H", f"{k}: {v}"))]
        done = subprocess.run(
            [*argv, f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True
        )
    line = next(x for x in done.stdout.splitlines() if x.startswith("WRK_RESULT"))
    requests, duration_us, socket_errors, non_2xx, p50_us, p99_us = map(int, line.split()[1:])
    return requests, duration_us / 1e6, socket_errors + non_2xx, p50_us / 1e3, p99_us / 1e3


def python_load(
    port: int, path: str, headers: dict[str, str], *, clients: int, duration: float
) -> LoadFigures:
    """The fallback load generator: asyncio, raw HTTP/1.1 keep-alive, one thread."""
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    request = (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
    latencies: list[float] = []
    errors = 0

    async def client(deadline: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (sent := time.perf_counter()) < deadline:
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - sent)
                errors += not status_line.split(b" ")[1].startswith(b"2")
        finally:
            writer.close()

    async def main() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(client(started + duration) for _ in range(clients)))
        return time.perf_counter() - started

    seconds = asyncio.run(main())
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3  # noqa: E731
    return len(latencies), seconds, errors, pick(0.5), pick(0.99)


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children (wrk)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# ----------------------------------------------------------------------------- upload


@dataclass
class UploadResult:
    megabytes: float
    seconds: float
    status: int
    rss_before_mb: float
    rss_peak_mb: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds

    @property
    def growth_mb(self) -> float:
        return self.rss_peak_mb - self.rss_before_mb


def write_chat_jsonl(path: Path, size: int) -> int:
    """Valid chat JSONL of about `size` bytes (whole lines); returns the exact size."""
    rng = random.Random(0)
    words = [
        "the",
        "a",
        "model",
        "data",
        "train",
        "loss",
        "token",
        "answer",
        "question",
        "help",
        "please",
        "user",
        "you",
    ]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful support assistant."},
                {"role": "user", "content": text(rng.randint(10, 60))},
                {"role": "assistant", "content": text(rng.randint(20, 200))},
            ]
        }
        for _ in range(2000)
    ]
    block = "".join(json.dumps(row) + "\n" for row in rows).encode()
    written = 0
    with path.open("wb") as out:
        while written + len(block) <= size:
            out.write(block)
            written += len(block)
        rest = block[: block.rfind(b"\n", 0, size - written) + 1]
        out.write(rest)
    return written + len(rest)


def upload(port: int, key: str, path: Path, pid: int) -> UploadResult:
    """POST /files with the file as a multipart part, sent with sendfile; RSS sampled."""
    boundary = "tuneq-bench-" + secrets.token_hex(8)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"'
        "\r\nContent-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size
    request = (
        f"POST /files HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(head) + size + len(tail)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sampler = RssSampler(pid)
    with sampler, socket.create_connection(("127.0.0.1", port)) as sock, path.open("rb") as f:
        started = time.perf_counter()
        try:
            sock.sendall(request + head)
            sock.sendfile(f)
            sock.sendall(tail)
        except BrokenPipeError:
            pass  # the server answered early (an error): read what it said
        response = _read_until_closed(sock)
        seconds = time.perf_counter() - started
    status = int(response.split(b" ", 2)[1])
    if status != 201:
        raise RuntimeError(f"upload failed: {response[:2000].decode(errors='replace')}")
    return UploadResult(size / MB, seconds, status, sampler.before_mb, sampler.peak_mb)


class RssSampler:
    """The process's resident memory before, and its peak while the block runs."""

    INTERVAL = 0.01

    def __init__(self, pid: int) -> None:
        self.status = Path(f"/proc/{pid}/status")
        self.before_mb = self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _read(self) -> dict[str, float]:
        fields = dict(line.split(":", 1) for line in self.status.read_text().splitlines())
        return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}  # kB -> MB

    def __enter__(self) -> RssSampler:
        start = self._read()
        self.before_mb, self._hwm_before = start["VmRSS"], start["VmHWM"]
        self.peak_mb = self.before_mb
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL):
            self.peak_mb = max(self.peak_mb, self._read()["VmRSS"])

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        hwm = self._read()["VmHWM"]
        if hwm > self._hwm_before:  # a peak between two samples
            self.peak_mb = max(self.peak_mb, hwm)


# ----------------------------------------------------------------------------- HTTP bits


def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)
    return response.status_code, response.json()


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------- the run


READS = (("get", "GET /jobs/{id}"), ("list", "GET /jobs?limit=20"))


def read_paths(job_id: str) -> dict[str, str]:
    return {"get": f"/jobs/{job_id}", "list": "/jobs?limit=20"}


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    loads: dict[tuple[str, str], LoadResult] = {}
    uploads: dict[str, UploadResult] = {}
    api_cmd = [sys.executable, "-m", "tuneq.cli", "api"]
    bare: Server | None = None
    try:
        for shape in args.shapes:
            with deployment(shape, work) as dep:
                auth = {"Authorization": f"Bearer {dep.key}"}
                paths = read_paths(dep.job_ids[JOBS // 2])
                api = Server(f"tuneq api ({shape})", api_cmd, dep.env, work / f"api-{shape}.log")
                try:
                    api.wait_ready()
                    if bare is None:  # the baseline serves the documents the API serves
                        bare = start_bare(api.port, paths, auth, work)
                        for name, path in paths.items():
                            loads["bare", name] = run_load(bare, path, {}, **_load_args(args))
                    for name, path in paths.items():
                        loads[shape, name] = run_load(api, path, auth, **_load_args(args))
                    if shape == "postgresql" and args.upload_mb > 0:
                        uploads[shape] = measure_upload(api, dep.key, work, args.upload_mb)
                finally:
                    api.stop()
    finally:
        if bare is not None:
            bare.stop()
    return report(loads, uploads, args)


def start_bare(api_port: int, paths: dict[str, str], auth: dict[str, str], work: Path) -> Server:
    docs = {name: http_get(api_port, path, auth)[1] for name, path in paths.items()}
    docs_path = work / "bare-docs.json"
    docs_path.write_text(json.dumps(docs))
    argv = [sys.executable, __file__, "--serve-bare", str(docs_path)]
    bare = Server("bare FastAPI", argv, dict(os.environ), work / "bare.log")
    bare.wait_ready()
    return bare


def _load_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"clients": args.clients, "duration": args.duration}


def measure_upload(api: Server, key: str, work: Path, megabytes: int) -> UploadResult:
    data = work / "upload.jsonl"
    write_chat_jsonl(data, megabytes * MB)
    try:
        return upload(api.port, key, data, api.pid)
    finally:
        data.unlink()


def report(
    loads: dict[tuple[str, str], LoadResult],
    uploads: dict[str, UploadResult],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Print the tables; return the JSON line's figures."""
    print(
        f"\n{args.clients} keep-alive clients, {args.duration:g} s a phase, load: {loader_name()}"
    )
    print(f"{os.cpu_count()} CPU cores; targets: >= {TARGET_RATIO:.0%} of bare, p99 < 25 ms\n")
    print(
        "| server | request | req/s | p50 ms | p99 ms | vs bare | errors | server CPU "
        "| CPU ms/req | load CPU |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    figures: dict[str, Any] = {"loader": loader_name().split(" (")[0], "clients": args.clients}
    for (shape, name), result in loads.items():
        ratio = result.requests_per_s / loads["bare", name].requests_per_s
        label = dict(READS)[name]
        print(
            f"| {shape} | {label} | {result.requests_per_s:,.0f} | {result.p50_ms:.1f} | "
            f"{result.p99_ms:.1f} | {ratio:.2f} | {result.errors} | {result.server_cpu:.0%} | "
            f"{1e3 * result.server_cpu / result.requests_per_s:.2f} | {result.loader_cpu:.0%} |"
        )
        prefix = {"postgresql": "", "sqlite": "sqlite_", "bare": "bare_"}[shape]
        key = {"get": "status_get", "list": "list"}[name]
        figures[f"{prefix}{key}_rps"] = round(result.requests_per_s, 1)
        figures[f"{prefix}{key}_p99_ms"] = round(result.p99_ms, 2)
        if shape != "bare":
            figures[f"{prefix}{key}_ratio"] = round(ratio, 3)
        figures["errors"] = figures.get("errors", 0) + result.errors
    if uploads:
        print("\n| server | upload | seconds | MB/s | RSS before MB | RSS peak MB | growth MB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for shape, up in uploads.items():
        print(
            f"| {shape} | {up.megabytes:,.0f} MB chat JSONL | {up.seconds:.1f} | "
            f"{up.mb_per_s:.0f} | {up.rss_before_mb:.0f} | {up.rss_peak_mb:.0f} | "
            f"{up.growth_mb:.0f} |"
        )
        figures["upload_mb"] = round(up.megabytes)
        figures["upload_mb_per_s"] = round(up.mb_per_s, 1)
        figures["upload_rss_growth_mb"] = round(up.growth_mb, 1)
    print_targets(figures)
    return figures


def print_targets(figures: dict[str, Any]) -> None:
    checks = [
        ("GET /jobs/{id} throughput vs bare", "status_get_ratio", TARGET_RATIO, True),
        ("GET /jobs/{id} p99 ms", "status_get_p99_ms", TARGET_P99_MS, False),
        ("upload MB/s", "upload_mb_per_s", TARGET_UPLOAD_MB_S, True),
        ("upload RSS growth MB", "upload_rss_growth_mb", TARGET_GROWTH_MB, False),
    ]
    print()
    for label, key, target, at_least in checks:
        if key in figures:
            met = figures[key] >= target if at_least else figures[key] < target
            sign = ">=" if at_least else "<"
            print(
                f"target {label} {sign} {target:g}: {figures[key]:g} ({'met' if met else 'MISSED'})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per read phase")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--upload-mb", type=int, default=1000, help="0: no upload")
    parser.add_argument(
        "--shapes",
        type=lambda s: s.split(","),
        default=["postgresql", "sqlite"],
        help="comma-separated: postgresql (first, it sets the baseline documents), sqlite",
    )
    parser.add_argument("--serve-bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare, args.port)
        return
    with tempfile.TemporaryDirectory(prefix="tuneq-api-load-") as work:
        figures = measure(args, Path(work))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
