"""What a run leaves behind: the metrics log, result.json and the output directory.

`workdir/output/` is written into a temporary sibling and renamed into place, so it either
holds a complete, loadable adapter or does not exist.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import peft
import torch
import transformers

from peft_engine import __version__
from peft_engine.diagnostics import DIAGNOSTICS_FILE, write_rows
from peft_engine.methods.weights import MODEL_INFO_FILE, WeightsFormat
from peft_engine.model_card import render_model_card

if TYPE_CHECKING:
    from peft_engine.checkpoint import TrainerState
    from peft_engine.prepare import PreparedJob


class MetricsLog:
    """metrics.jsonl: one JSON object per line, `{"step": n, ...metrics}`, in step order."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def reset(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def truncate_after(self, step: int) -> None:
        """Drop lines a crashed run wrote after the checkpoint it is resumed from."""
        rows = self.read() if self.path.exists() else []
        self.reset()
        for row in rows:
            if row["step"] <= step:
                self.write(row.pop("step"), row)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


@dataclass(frozen=True)
class KeptEvaluation:
    """The whole validation set's metrics and report for the weights in the output: from
    the periodic evaluations when they used the whole set, else from a final evaluation."""

    metrics: dict[str, float]
    report: dict[str, Any]
    source: Literal["periodic", "final"]


def build_result(
    job: PreparedJob,
    state: TrainerState,
    *,
    wall_seconds: float,
    early_stopped: bool,
    kept: KeptEvaluation | None = None,
) -> dict[str, Any]:
    """result.json. metrics.initial, .final and .best are periodic evaluations (on the plan's
    sample when it has one: `evaluation.periodic_sample_size`); metrics.kept is the whole
    validation set's, for the weights in the output."""
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "spec": job.spec.model_dump(mode="json"),
        "base_model": job.entry.name,
        "metrics": {
            "initial": state.initial_metrics,
            "final": state.last_eval if state.step else {},
            "best": state.best_metrics,
            "kept": kept.metrics if kept else {},
        },
        "best_step": state.early_stopping.best_step,
        "evaluation": _evaluation(job, state, kept),
        # the task's report for the weights in the output (whole set), else the last's
        "report": kept.report if kept else state.best_report or state.last_report,
        "labels": list(job.labels) if job.labels else None,
        "steps": state.step,
        "total_steps": state.total_steps,
        "early_stopped": early_stopped,
        "trained_tokens": state.trained_tokens,
        "trained_loss_tokens": state.trained_loss_tokens,
        "tokens_per_second": state.trained_tokens / state.timings.train_seconds
        if state.timings.train_seconds
        else 0.0,
        "train_examples": len(job.train.examples),
        "validation_examples": len(job.validation.examples) if job.validation else 0,
        "truncated_examples": job.train.truncated,
        "dropped_examples": job.train.dropped,
        "wall_seconds": wall_seconds,
        "timings": asdict(state.timings),
        "peak_memory_bytes": peak_memory_bytes(),
        "device": device_name,
        "versions": {
            "peft_engine": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def _evaluation(
    job: PreparedJob, state: TrainerState, kept: KeptEvaluation | None
) -> dict[str, Any]:
    """Which numbers came from which evaluation."""
    hp = job.spec.hyperparameters
    n_validation = len(job.validation.examples) if job.validation else 0
    final = {
        None: None,
        "periodic": "the periodic evaluations used the whole set"
        if hp.eval_sample_size is None
        else "the periodic sample (a whole-set pass would go over eval_budget)",
        "final": "whole set on the kept weights",
    }[kept.source if kept else None]
    return {
        "validation_examples": n_validation,
        "periodic_sample_size": min(hp.eval_sample_size or n_validation, n_validation),
        "eval_every_steps": hp.eval_every_steps,
        # the base model's and those during training, on the same examples
        "evaluations": state.timings.evaluations - (kept is not None and kept.source == "final"),
        "final": final,
    }


def write_output(
    workdir: Path,
    *,
    model: Any,
    weights: WeightsFormat,
    tokenizer: Any,
    job: PreparedJob,
    result: dict[str, Any],
    metrics_log: MetricsLog,
    model_info: dict[str, Any] | None = None,
    diagnostics: list[dict[str, Any]] | None = None,
) -> Path:
    final = workdir / "output"
    tmp = workdir / "output.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (weights.export or weights.save)(model, tmp)
    if (tmp / "adapter_config.json").is_file():
        _name_base_model(tmp / "adapter_config.json", job.entry.name)
    tokenizer.save_pretrained(tmp)
    if model_info is not None:
        (tmp / MODEL_INFO_FILE).write_text(json.dumps(model_info, indent=2))
    shutil.copyfile(metrics_log.path, tmp / "metrics.jsonl")
    (tmp / "result.json").write_text(json.dumps(result, indent=2))
    if diagnostics is not None:
        write_rows(tmp / DIAGNOSTICS_FILE, diagnostics)
    (tmp / "README.md").write_text(render_model_card(job, result))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _name_base_model(config_path: Path, name: str) -> None:
    # Name the base by its registry name: the local cache path means nothing on another
    # machine. Set after saving, as peft looks a non-path name up on the hub while saving.
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


def peak_memory_bytes() -> int:
    """Peak memory of this process: the GPU's allocator on CUDA, else the resident set."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
