"""`tuneq.client.Client`: the API from Python, typed, with retries that are safe.

from tuneq.client import Client

with Client() as tuneq:  # TUNEQ_URL and TUNEQ_API_KEY, as `tuneq up` prints them
    train = tuneq.files.upload("train.jsonl")
    job = tuneq.jobs.create({"model": "smollm2-135m-instruct", "training_file": train.id})
    for event in (follow := tuneq.jobs.follow(job.id)):
        print(event.message)
    tuneq.jobs.download(job.id, out="adapter")  # PeftModel.from_pretrained(base, "adapter")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, overload

from tuneq.client.download import fetch, fetch_archive
from tuneq.client.errors import MissingSetting, TuneqAPIError
from tuneq.client.follow import JobFollow
from tuneq.client.transport import RetryPolicy, Transport
from tuneq.client.types import (
    Artifact,
    Checkpoint,
    Diagnostics,
    Estimate,
    Event,
    File,
    FileDeleted,
    Job,
    Metrics,
    Model,
    Page,
)

ADAPTER = "adapter.tar.gz"


class Client:
    """One API and key; `files`, `models` and `jobs` hold the calls. Close it (or use
    `with`) to release its connections."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        if url is None or api_key is None:
            from tuneq.settings import Settings

            settings = Settings()
            url = url or settings.url
            api_key = api_key or (settings.api_key and settings.api_key.get_secret_value())
        if not url or not api_key:
            missing = " and ".join(
                name
                for name, value in (("TUNEQ_URL", url), ("TUNEQ_API_KEY", api_key))
                if not value
            )
            raise MissingSetting(
                f"{missing} not set: export the TUNEQ_URL=... and TUNEQ_API_KEY=... lines "
                "that `tuneq up` prints (or your deployment's URL and key)"
            )
        self.transport = Transport(url, api_key, timeout=timeout, retry=retry or RetryPolicy())
        self.files = Files(self.transport)
        self.models = Models(self.transport)
        self.jobs = Jobs(self.transport)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Files:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def upload(
        self, path: str | Path, *, purpose: str = "fine-tune", filename: str | None = None
    ) -> File:
        """Upload a dataset, streamed from disk (under `filename`, default the path's name);
        a file that fails validation raises TuneqAPIError whose `errors` name the lines."""
        path = Path(path)
        with path.open("rb") as content:
            body = self.transport.json(
                "POST",
                "/files",
                create=True,
                files={"file": (filename or path.name, content)},
                data={"purpose": purpose},
            )
        return File.of(body)

    def list(self, *, limit: int = 20, after: str | None = None) -> Page[File]:
        params = _params(limit=limit, after=after)
        return Page.of(File, self.transport.json("GET", "/files", params=params))

    def get(self, file_id: str) -> File:
        return File.of(self.transport.json("GET", f"/files/{file_id}"))

    def delete(self, file_id: str) -> FileDeleted:
        return FileDeleted.of(self.transport.json("DELETE", f"/files/{file_id}"))

    def download(self, file_id: str, out: str | Path) -> Path:
        """The file's content, streamed into the file `out`."""
        out = Path(out)
        fetch(self.transport, f"/files/{file_id}/content", out)
        return out


class Models:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def list(self) -> list[Model]:
        return Page.of(Model, self.transport.json("GET", "/models")).data


class Jobs:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    @overload
    def create(self, spec: dict[str, Any], *, dry_run: Literal[False] = False) -> Job: ...
    @overload
    def create(self, spec: dict[str, Any], *, dry_run: Literal[True]) -> Estimate: ...

    def create(self, spec: dict[str, Any], *, dry_run: bool = False) -> Job | Estimate:
        """Submit a job spec (DESIGN §5); with `dry_run`, only validate and estimate it."""
        params = {"dry_run": "true"} if dry_run else None
        body = self.transport.json("POST", "/jobs", create=True, json=spec, params=params)
        return Estimate.of(body) if dry_run else Job.of(body)

    def list(
        self,
        *,
        limit: int = 20,
        after: str | None = None,
        status: str | None = None,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Page[Job]:
        """Newest first."""
        params = _params(limit=limit, after=after, status=status, model=model)
        params |= {f"metadata[{k}]": v for k, v in (metadata or {}).items()}
        return Page.of(Job, self.transport.json("GET", "/jobs", params=params))

    def get(self, job_id: str) -> Job:
        return Job.of(self.transport.json("GET", f"/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return Job.of(self.transport.json("POST", f"/jobs/{job_id}/cancel"))

    def pause(self, job_id: str) -> Job:
        return Job.of(self.transport.json("POST", f"/jobs/{job_id}/pause"))

    def resume(self, job_id: str) -> Job:
        return Job.of(self.transport.json("POST", f"/jobs/{job_id}/resume"))

    def events(self, job_id: str, *, after: int | None = None, limit: int = 100) -> Page[Event]:
        """Oldest first, those with an id above `after`."""
        params = _params(limit=limit, after=after)
        return Page.of(Event, self.transport.json("GET", f"/jobs/{job_id}/events", params=params))

    def metrics(self, job_id: str) -> Metrics:
        return Metrics.of(self.transport.json("GET", f"/jobs/{job_id}/metrics"))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return Page.of(Checkpoint, self.transport.json("GET", f"/jobs/{job_id}/checkpoints")).data

    def artifacts(self, job_id: str) -> list[Artifact]:
        return Page.of(Artifact, self.transport.json("GET", f"/jobs/{job_id}/artifacts")).data

    def diagnostics(self, job_id: str) -> Diagnostics:
        """A finished job's worst validation examples, hardest training examples and most
        confused labels (a 409 job_not_finished TuneqAPIError before it has a result, a 409
        diagnostics_unavailable for a job that ran before they were recorded)."""
        return Diagnostics.of(self.transport.json("GET", f"/jobs/{job_id}/diagnostics"))

    def follow(self, job_id: str, *, after: int | None = None) -> JobFollow:
        """The job's events live (after the event `after`), then `.job` as it ended."""
        return JobFollow(self, job_id, after=after)

    def download(
        self, job_id: str, *, checkpoint: int | None = None, out: str | Path | None = None
    ) -> Path:
        """The trained adapter (or a checkpoint's), checked against its sha256 and unpacked
        into `out` (default ./JOB_ID/adapter or ./JOB_ID/checkpoint-STEP), a directory
        `PeftModel.from_pretrained(base_model, out)` loads."""
        name = ADAPTER if checkpoint is None else f"checkpoint-{checkpoint}.tar.gz"
        listed = {a.name: a for a in self.artifacts(job_id)}
        if name not in listed:
            raise TuneqAPIError(
                404, "not_found", f"job {job_id} has no artifact {name!r}", param="checkpoint"
            )
        target = Path(out) if out is not None else Path(job_id) / name.removesuffix(".tar.gz")
        path = f"/jobs/{job_id}/artifacts/{name}"
        return fetch_archive(self.transport, path, sha256=listed[name].sha256, out=target)


def _params(**values: Any) -> dict[str, Any]:
    """Query parameters, those left unset dropped."""
    return {k: v for k, v in values.items() if v is not None}
