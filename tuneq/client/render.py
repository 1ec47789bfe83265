"""What the user commands print: short human lines, or with `--json` the API's documents
alone on stdout (errors go to stderr either way)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from peft_engine.progress import ConsoleProgress, format_duration
from tuneq.client.errors import TuneqAPIError
from tuneq.client.progress import draw_event
from tuneq.client.types import (
    Checkpoint,
    Diagnostics,
    Estimate,
    Event,
    File,
    Job,
    Metrics,
    Model,
    Page,
)


class Output:
    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json

    def document(self, raw: Any, human: str) -> None:
        """One result: the document as JSON, or a line for people."""
        print(json.dumps(raw) if self.as_json else human, flush=True)

    def problem(self, err: TuneqAPIError) -> None:
        if self.as_json:
            print(json.dumps(err.problem), file=sys.stderr)
            return
        status = f", HTTP {err.status}" if err.status else ""
        lines = [f"error: {err.detail} ({err.code}{status})"]
        lines += [f"  {item}" for item in err.errors]
        more = int(err.problem.get("total_errors") or 0) - len(err.errors)
        if err.errors and more > 0:
            lines.append(f"  ... and {more} more")
        print("\n".join(lines), file=sys.stderr)

    # -- files and models -----------------------------------------------------------------

    def file(self, file: File, verb: str, *, document: bool = True) -> None:
        """A file and its validation report; `document=False` prints it for people only."""
        if self.as_json:
            if document:
                self.document(file.raw, "")
            return
        print(f"{verb} {file.id} ({file.filename}, {file.bytes:,} bytes): "
              f"{file.examples:,} {file.format} examples")  # fmt: skip
        for name, value in file.report.items():
            print(f"  {name}: {_compact(value)}")

    def files(self, page: Page[File]) -> None:
        rows = [
            [f.id, f.filename, f.format, f"{f.examples:,}", _when(f.created_at)] for f in page.data
        ]
        self._table(
            page.raw, ["ID", "FILENAME", "FORMAT", "EXAMPLES", "CREATED"], rows, page.has_more
        )

    def models(self, models: list[Model]) -> None:
        rows = [
            [m.id, ",".join(m.tasks), _sequence_length(m), "yes" if m.available else "no"]
            for m in models
        ]
        raw = {"object": "list", "data": [m.raw for m in models], "has_more": False}
        self._table(raw, ["MODEL", "TASKS", "MAX_SEQ_LENGTH", "AVAILABLE"], rows, False)

    # -- jobs -------------------------------------------------------------------------------

    def estimate(self, dry: Estimate) -> None:
        self.document(
            dry.raw, f"dry run (nothing created): {_plan(dry.method, dry.model, dry.estimate)}"
        )

    def created(self, job: Job) -> None:
        self.document(
            job.raw, f"created {job.id}: {_plan(job.method, job.model, job.estimate or {})}"
        )

    def jobs(self, page: Page[Job]) -> None:
        rows = [
            [
                j.id,
                j.status,
                j.model,
                str(j.method.get("type", "")),
                _progress(j),
                _when(j.created_at),
            ]
            for j in page.data
        ]
        header = ["ID", "STATUS", "MODEL", "METHOD", "PROGRESS", "CREATED"]
        self._table(page.raw, header, rows, page.has_more)

    def job(self, job: Job) -> None:
        lines = [
            f"{job.id}: {job.status}",
            f"  {job.task}: {_plan(job.method, job.model, job.estimate or {})}",
            f"  progress {_progress(job)}, attempt {job.attempt}",
        ]
        if job.error:
            lines.append(f"  error {job.error.get('code')}: {job.error.get('message')}")
        if job.result:
            lines.append(f"  result {_result(job)}")
        self.document(job.raw, "\n".join(lines))

    def events(self, page: Page[Event]) -> None:
        rows = [[str(e.id), e.type, e.level, e.message] for e in page.data]
        self._table(page.raw, ["ID", "TYPE", "LEVEL", "MESSAGE"], rows, page.has_more)

    def metrics(self, metrics: Metrics) -> None:
        if self.as_json:
            self.document(metrics.raw, "")
            return
        for name, points in (("train", metrics.train), ("eval", metrics.eval)):
            columns = sorted({key for point in points for key in point} - {"step"})
            rows = [[str(p["step"]), *(_number(p.get(c)) for c in columns)] for p in points]
            print(f"{name} ({len(points)} points)")
            _print_table(["STEP", *(c.upper() for c in columns)], rows)

    def checkpoints(self, checkpoints: Sequence[Checkpoint]) -> None:
        rows = [
            [str(c.step), c.artifact, ", ".join(f"{k} {_number(v)}" for k, v in c.metrics.items())]
            for c in checkpoints
        ]
        raw = {"object": "list", "data": [c.raw for c in checkpoints], "has_more": False}
        self._table(raw, ["STEP", "ARTIFACT", "METRICS"], rows, False)

    def diagnostics(self, diagnostics: Diagnostics) -> None:
        if self.as_json:
            self.document(diagnostics.raw, "")
            return
        example = ["LINE", "LOSS", "EXAMPLE"]
        sections = (
            ("worst validation examples", diagnostics.worst_validation, example, _example_row),
            ("hardest training examples", diagnostics.hardest_training, example, _example_row),
            ("most confused labels", diagnostics.confused_labels,
             ["COUNT", "GOLD -> PREDICTED", "LINES"], _confusion_row),
        )  # fmt: skip
        for title, rows, header, row in sections:
            if rows:
                print(f"{title} ({rows[0]['file']})")
                _print_table(header, [row(r) for r in rows])

    @contextmanager
    def following(self) -> Iterator[Callable[[Event], None]]:
        """A function that shows each event: a progress bar on a terminal, lines otherwise,
        JSON lines with --json."""
        if self.as_json:
            yield lambda event: print(json.dumps(event.raw), flush=True)
            return
        progress = ConsoleProgress(sys.stdout)
        yield lambda event: draw_event(progress, event)

    def ended(self, job: Job) -> None:
        human = f"{job.id} {job.status}"
        if job.error:
            human += f": {job.error.get('code')}: {job.error.get('message')}"
        elif job.result:
            human += f": {_result(job)}"
        self.document(job.raw, human)

    def downloaded(self, job_id: str, checkpoint: int | None, out: Path) -> None:
        what = "adapter" if checkpoint is None else f"checkpoint of step {checkpoint}"
        raw = {"job": job_id, "checkpoint": checkpoint, "path": str(out)}
        self.document(raw, f"{job_id}: the {what} (sha256 checked) unpacked into {out}")

    def _table(self, raw: Any, header: list[str], rows: list[list[str]], has_more: bool) -> None:
        if self.as_json:
            self.document(raw, "")
            return
        _print_table(header, rows)
        if has_more:
            print("(more: --after the last ID)")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _example_row(row: dict[str, Any]) -> list[str]:
    labels = f"[{row['gold']} -> {row['predicted']}] " if "gold" in row else ""
    return [str(row["line"]), _number(row["loss"]), labels + (row.get("preview") or "")]


def _confusion_row(row: dict[str, Any]) -> list[str]:
    lines = ", ".join(map(str, row["lines"]))
    return [str(row["count"]), f"{row['gold']} -> {row['predicted']}", lines]


def _plan(method: dict[str, Any], model: str, estimate: dict[str, Any]) -> str:
    """ "lora on tiny-llama, 20 steps, ~1,234 tokens, about 12s"."""
    parts = [f"{method.get('type', '?')} on {model}"]
    if estimate.get("total_steps") is not None:
        parts.append(f"{estimate['total_steps']} steps")
    if estimate.get("trained_tokens") is not None:
        parts.append(f"~{estimate['trained_tokens']:,} tokens")
    if estimate.get("trained_images") is not None:
        parts.append(f"{estimate['trained_images']:,} images")
    if estimate.get("estimated_seconds") is not None:
        parts.append(f"about {format_duration(estimate['estimated_seconds'])}")
    return ", ".join(parts)


def _progress(job: Job) -> str:
    progress = job.progress or {}
    if "step" not in progress:
        return "-"
    text = f"{progress['step']}/{progress.get('total_steps', '?')}"
    if job.status == "running" and progress.get("eta_seconds") is not None:
        text += f" ETA {format_duration(progress['eta_seconds'])}"
    return text


def _result(job: Job) -> str:
    result = job.result or {}
    metrics = result.get("metrics") or {}
    best, initial = metrics.get("best") or {}, metrics.get("initial") or {}
    if "eval_loss" in best and "eval_loss" in initial:
        text = (
            f"eval loss {initial['eval_loss']:.4f} -> {best['eval_loss']:.4f} "
            f"(best step {result.get('best_step')})"
        )
        kept = metrics.get("kept") or {}
        if "accuracy" in kept:  # classification: the output's weights on the whole set
            text += f"; accuracy on the whole validation set {kept['accuracy']:.4f}"
        return text
    unit = "images" if job.task == "image_classification" else "tokens"
    return f"{job.trained_tokens or 0:,} {unit} trained"


def _compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_compact(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return ", ".join(map(_compact, value)) or "-"
    return _number(value)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")


def _sequence_length(model: Model) -> str:
    """A text model's longest sequence ("?" until its files are read); "-" for an image
    model, which has none."""
    if model.tasks and all(task == "image_classification" for task in model.tasks):
        return "-"
    return str(model.max_seq_length or "?")
