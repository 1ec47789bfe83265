"""Per-example diagnostics: which examples the trained model finds hardest, and why.

The losses come from the loss functions themselves (`LossSum.examples`, a segment sum of
the item losses they compute anyway; `ExampleResult` from each evaluation), so nothing is
run twice. Three things are kept, all bounded and all in the trainer state, so a resumed
run ends with the same diagnostics as an uninterrupted one:

- `TrainLossTracker`: per training line, its loss per item at its latest pass, and the sum
  and count of its passes (the running mean across epochs). These are losses in training
  mode (dropout on) under the weights before that pass's update. One entry per line up to
  TRACKED_LINES (100,000: every dataset the bench uses); beyond that, the half with the
  lowest latest loss is dropped, so the hardest stay exact and the state stays bounded.
- the summary of the last evaluation and of the best one (the weights kept): the
  WORST_EXAMPLES highest-loss examples and the most confused (gold → predicted) label
  pairs with their counts and a few example lines; an evaluation's full per-example list
  is never stored.

`build_diagnostics` turns them into `diagnostics.jsonl` (one JSON object per line, each
with a `kind`: `worst_validation`, `hardest_training`, `confused_labels`) and the small
`result.diagnostics` summary. Previews (at most PREVIEW_CHARS characters) are made from
the original records, read again from the job's data files at the end.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_engine.data.examples import DataFormat, Example
from peft_engine.errors import UserError

if TYPE_CHECKING:
    from peft_engine.prepare import PreparedJob
    from peft_engine.tasks.base import ExampleLosses, ExampleResult

DIAGNOSTICS_FILE = "diagnostics.jsonl"
WORST_EXAMPLES = 20  # worst validation and hardest training examples kept
CONFUSED_PAIRS = 10  # (gold, predicted) pairs kept
LINES_PER_PAIR = 5  # example lines kept per pair
SUMMARY_ITEMS = 5  # of each list, in result.json
PREVIEW_CHARS = 200
TRACKED_LINES = 100_000


@dataclass
class TrainLossTracker:
    """Per training line: [loss per item at its latest pass, sum over passes, passes]."""

    losses: dict[int, list[float]] = field(default_factory=dict)

    def record(self, examples: ExampleLosses | None) -> None:
        if examples is None:
            return
        for line, loss, n_items in zip(
            examples.lines, examples.loss.tolist(), examples.n_items, strict=True
        ):
            per_item = loss / max(n_items, 1)
            entry = self.losses.get(line)
            if entry is None:
                self.losses[line] = [per_item, per_item, 1]
            else:
                entry[0], entry[1], entry[2] = per_item, entry[1] + per_item, entry[2] + 1
        if len(self.losses) > TRACKED_LINES:
            kept = sorted(self.losses.items(), key=lambda item: -item[1][0])
            self.losses = dict(kept[: TRACKED_LINES // 2])

    def hardest(self, k: int = WORST_EXAMPLES) -> list[dict[str, Any]]:
        """The k lines with the highest loss at their latest pass, highest first."""
        ranked = sorted(self.losses.items(), key=lambda item: (-item[1][0], item[0]))[:k]
        return [
            {"line": line, "loss": latest, "mean_loss": total / passes, "passes": int(passes)}
            for line, (latest, total, passes) in ranked
        ]


@dataclass
class DiagnosticsState:
    """What the trainer state keeps for the diagnostics (JSON, bounded)."""

    train: TrainLossTracker = field(default_factory=TrainLossTracker)
    last_eval: dict[str, Any] = field(default_factory=dict)  # summarise_eval's
    best_eval: dict[str, Any] = field(default_factory=dict)  # of the weights kept

    def record_eval(self, step: int, examples: Sequence[ExampleResult]) -> None:
        self.last_eval = summarise_eval(step, examples)

    def keep_best(self) -> None:
        self.best_eval = self.last_eval

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DiagnosticsState:
        losses = data.get("train", {}).get("losses", {})
        return cls(
            train=TrainLossTracker({int(line): entry for line, entry in losses.items()}),
            last_eval=data.get("last_eval", {}),
            best_eval=data.get("best_eval", {}),
        )


def summarise_eval(step: int, examples: Sequence[ExampleResult]) -> dict[str, Any]:
    """An evaluation's worst examples (by loss per item) and most confused label pairs."""
    ranked = sorted(examples, key=lambda e: (-e.loss / max(e.n_items, 1), e.line))
    worst = [
        {
            "line": e.line,
            "loss": e.loss / max(e.n_items, 1),
            "n_items": e.n_items,
            **({"gold": e.gold, "predicted": e.predicted} if e.gold is not None else {}),
        }
        for e in ranked[:WORST_EXAMPLES]
    ]
    return {
        "step": step,
        "examples": len(examples),
        "worst": worst,
        "confusions": confusions(examples),
    }


def confusions(examples: Iterable[ExampleResult]) -> list[dict[str, Any]]:
    """The most frequent (gold → predicted) mistakes, with the first lines that make them."""
    counts: Counter[tuple[str, str]] = Counter()
    lines: dict[tuple[str, str], list[int]] = {}
    for example in examples:
        for pair in example.mistakes:
            counts[pair] += 1
            seen = lines.setdefault(pair, [])
            if len(seen) < LINES_PER_PAIR and example.line not in seen:
                seen.append(example.line)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:CONFUSED_PAIRS]
    return [
        {"gold": gold, "predicted": predicted, "count": count, "lines": lines[(gold, predicted)]}
        for (gold, predicted), count in ranked
    ]


@dataclass(frozen=True)
class Diagnostics:
    rows: list[dict[str, Any]]  # diagnostics.jsonl
    summary: dict[str, Any]  # result.json's "diagnostics"


def build_diagnostics(state: DiagnosticsState, job: PreparedJob) -> Diagnostics:
    """The diagnostics of the kept weights' evaluation and of the training passes."""
    evaluation = state.best_eval or state.last_eval
    hardest = state.train.hardest()
    train_file = "training_file"
    eval_file = "validation_file" if job.data and job.data.validation else train_file
    previews = _previews(
        job,
        train_lines={h["line"] for h in hardest},
        eval_lines={w["line"] for w in evaluation.get("worst", [])},
    )
    rows: list[dict[str, Any]] = []
    for rank, worst in enumerate(evaluation.get("worst", []), 1):
        preview = previews[eval_file].get(worst["line"])
        rows.append({"kind": "worst_validation", "rank": rank, "file": eval_file, **worst,
                     "step": evaluation["step"], "preview": preview})  # fmt: skip
    for rank, hard in enumerate(hardest, 1):
        preview = previews[train_file].get(hard["line"])
        rows.append({"kind": "hardest_training", "rank": rank, "file": train_file, **hard,
                     "preview": preview})  # fmt: skip
    for rank, pair in enumerate(evaluation.get("confusions", []), 1):
        rows.append({"kind": "confused_labels", "rank": rank, "file": eval_file, **pair,
                     "step": evaluation["step"]})  # fmt: skip
    summary = {
        "file": DIAGNOSTICS_FILE,
        "eval_step": evaluation.get("step"),
        "worst_validation": [
            {"line": w["line"], "loss": w["loss"]}
            for w in evaluation.get("worst", [])[:SUMMARY_ITEMS]
        ],
        "hardest_training": [
            {"line": h["line"], "loss": h["loss"]} for h in hardest[:SUMMARY_ITEMS]
        ],
        "most_confused": [
            {k: pair[k] for k in ("gold", "predicted", "count")}
            for pair in evaluation.get("confusions", [])[:SUMMARY_ITEMS]
        ],
    }
    return Diagnostics(rows, summary)


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _previews(
    job: PreparedJob, *, train_lines: set[int], eval_lines: set[int]
) -> dict[str, dict[int, str]]:
    """Previews of the wanted lines, by file ("training_file", "validation_file"). The
    files are read again (nothing of them is held while training); a file that cannot be
    read gives no previews rather than failing the job at its end."""
    from peft_engine.prepare import read_job_examples

    found: dict[str, dict[int, str]] = {"training_file": {}, "validation_file": {}}
    if job.data is None:
        return found
    try:
        train, validation = read_job_examples(job.spec, job.data)
    except (OSError, UserError):
        return found
    eval_file = "validation_file" if job.data.validation else "training_file"
    for examples, file, wanted in (
        (train, "training_file", train_lines),
        (validation, eval_file, eval_lines),
    ):
        for example in examples:
            if example.line in wanted:
                found[file][example.line] = preview(example)
    return found


def preview(example: Example) -> str:
    """The example's text in one line, at most PREVIEW_CHARS characters."""
    record = example.record
    if example.format is DataFormat.CHAT:
        text = " | ".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    elif example.format is DataFormat.PROMPT_COMPLETION:
        text = f"{record['prompt']} → {record['completion']}"
    elif example.format is DataFormat.PREFERENCE:
        prompt = " | ".join(f"{m['role']}: {m['content']}" for m in record["input"]["messages"])
        chosen = record["preferred_output"][0]["content"]
        rejected = record["non_preferred_output"][0]["content"]
        text = f"{prompt} → preferred: {chosen} | not: {rejected}"
    elif example.format is DataFormat.TOKEN_CLASSIFICATION:
        text = " ".join(record["tokens"])
    elif example.format is DataFormat.IMAGE_CLASSIFICATION:
        image = record["image"]  # a file (Path) or the image's bytes (a string)
        text = f"{image.parent.name}/{image.name}" if isinstance(image, Path) else "<inline image>"
    elif "text_a" in record:
        text = f"{record['text_a']} / {record['text_b']}"
    else:
        text = str(record["text"])
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + "…"
