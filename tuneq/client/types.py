"""What the SDK's methods return: the API's JSON documents as typed, read-only objects.

Each keeps the document it was made from in `raw` (what `--json` prints), and ignores
members it does not know, so a newer server does not break an older client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Document:
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls: type[D], raw: dict[str, Any]) -> D:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(raw=raw, **{name: raw[name] for name in names if name in raw})


D = TypeVar("D", bound=Document)


@dataclass(frozen=True)
class File(Document):
    id: str = ""
    filename: str = ""
    bytes: int = 0
    purpose: str = ""
    format: str = ""
    examples: int = 0
    created_at: int = 0
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FileDeleted(Document):
    id: str = ""
    deleted: bool = False


@dataclass(frozen=True)
class Model(Document):
    id: str = ""
    description: str | None = None
    tasks: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    max_seq_length: int | None = None
    available: bool = False


@dataclass(frozen=True)
class Job(Document):
    id: str = ""
    status: str = ""
    model: str = ""
    task: str = ""
    method: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    training_file: str = ""
    validation_file: str | None = None
    suffix: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    attempt: int = 0
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    created_at: int = 0
    started_at: int | None = None
    finished_at: int | None = None

    @property
    def done(self) -> bool:
        """Whether the job has ended (succeeded, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class Estimate(Document):
    """A dry run's answer: the spec as resolved, and the tokens, steps and time it needs."""

    model: str = ""
    task: str = ""
    method: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Event(Document):
    id: int = 0
    type: str = "message"  # "message" or "metrics"
    level: str = "info"
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    created_at: int = 0


@dataclass(frozen=True)
class Metrics(Document):
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoint(Document):
    step: int = 0
    attempt: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: str = ""
    created_at: int = 0


@dataclass(frozen=True)
class Artifact(Document):
    name: str = ""
    kind: str = ""
    step: int | None = None
    bytes: int = 0
    sha256: str = ""
    created_at: int = 0


@dataclass(frozen=True)
class Diagnostics(Document):
    """A finished job's per-example diagnostics: rows of diagnostics.jsonl, each with a
    `kind` (worst_validation, hardest_training, confused_labels), and the result's summary."""

    job_id: str = ""
    summary: dict[str, Any] | None = None
    data: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [row for row in self.data if row.get("kind") == kind]

    @property
    def worst_validation(self) -> list[dict[str, Any]]:
        return self.of_kind("worst_validation")

    @property
    def hardest_training(self) -> list[dict[str, Any]]:
        return self.of_kind("hardest_training")

    @property
    def confused_labels(self) -> list[dict[str, Any]]:
        return self.of_kind("confused_labels")


T = TypeVar("T", bound=Document)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list (DESIGN §4): `after=page.data[-1].id` asks for the next."""

    data: list[T]
    has_more: bool
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def of(cls, item: type[T], raw: dict[str, Any]) -> Page[T]:
        return cls([item.of(x) for x in raw["data"]], bool(raw.get("has_more")), raw)
