"""How well a job's time is foretold: the live ETA and the dry-run estimate against the time
the job really took.

    .venv/bin/python bench/eta.py                        # the tiny shapes, about a minute
    .venv/bin/python bench/eta.py --shapes dolly96-191   # issue 15's job (15+ minutes on CPU)

Each shape is one job run by `peft_engine.train` in a fresh process, so its model's load is
in it, as in a worker's first job. At every optimizer step the script keeps the engine's
`eta_seconds` (the `on_metrics` hook) and the time; once `train` returns, the time that was
really left at that step is known. The table gives the ETA's error at step 1 and at 10%,
25% and 50% of the steps, as (ETA - time left) / time left (-40% is an ETA 40% short), and
the dry run's estimate (`peft_engine.estimate`) against the whole `train` call, with the
figures a deployment would have:

  default   the TUNEQ_ESTIMATED_* settings: no job of the model has finished yet
  measured  what the worker records (`tuneq.throughput`, here in a scratch SQLite database)
            from the runs of the same model earlier in this run; a model's first run is
            estimated with its own figures (marked *), which checks the phase accounting
            (evaluations, checkpoints, tokens) rather than the speed

Shapes (--shapes, comma-separated):

  tiny        a random 4-layer Llama (hidden 256) built from a config, LoRA r=8, 128
              generated chats, 2 epochs of batch 8, no validation (none held out)
  tiny-eval   the same with 32 validation chats and the default cadence
  tiny-dense  the same, evaluated every 2 steps and checkpointed every 4
  smol-dolly  LoRA on SmolLM2-135M-Instruct, 32 Dolly chats, 16 validation chats, defaults
  dolly96     LoRA on SmolLM2-135M-Instruct: the first 96 chats of Dolly's train file, the
              whole validation file (100 chats), every setting its default
  dolly96-191 the same with 191 validation chats, issue 15's check: the validation file
              and the last 91 chats of the train file (none of them trained on)

The eval share is the job's evaluation seconds over its wall time, from result.json's
timings when the engine records them. Data: ../shared/data/dolly beside the repository (or
--data DIR). Prints one table, then one JSON object with the figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.conftest: the tiny tokenizer the tests build
DEFAULT_DATA = ROOT.parent / "shared" / "data"
TINY = "bench-tiny-llama"
SMOL = "smollm2-135m-instruct"
POINTS = (0.10, 0.25, 0.50)  # shares of the steps at which the ETA is read

from tuneq.throughput.service import (  # noqa: E402
    JobFigures,
    default_throughput,
    record_job_figures,
    throughput_for,
)


@dataclass(frozen=True)
class Shape:
    model: str
    n_train: int
    n_validation: int | None  # None: no validation file; 0: the whole Dolly validation file
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] | None = None  # None: the default (LoRA)


_TINY_HP = {"n_epochs": 2, "batch_size": 8, "learning_rate": 2e-3, "max_seq_length": 128}
_TINY_LORA = {"type": "lora", "r": 8, "alpha": 16}
SHAPES = {
    "tiny": Shape(TINY, 128, None, _TINY_HP, _TINY_LORA),
    "tiny-eval": Shape(TINY, 128, 32, _TINY_HP, _TINY_LORA),
    "tiny-dense": Shape(
        TINY, 128, 32, _TINY_HP | {"eval_every_steps": 2, "checkpoint_every_steps": 4}, _TINY_LORA
    ),
    "smol-dolly": Shape(SMOL, 32, 16),
    "dolly96": Shape(SMOL, 96, 0),
    "dolly96-191": Shape(SMOL, 96, 191),
}
DEFAULT_SHAPES = "tiny,tiny-eval,tiny-dense"


def main() -> None:
    args = _parse()
    if args.run:
        print("RESULT " + json.dumps(run_one(*args.run)), flush=True)
        return
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    with tempfile.TemporaryDirectory(prefix="tuneq-eta-") as scratch:
        bench = _Bench(Path(scratch), Path(args.data), Path(args.cache_dir))
        rows = [bench.run(name) for name in names]
    _print_table(rows)


def _key(model: str) -> dict[str, str]:
    """The throughput table's key of a shape's jobs (every shape is causal_lm)."""
    return {"model": model, "task": "causal_lm"}


class _Bench:
    """The shapes' files, the model registry, and the throughput table they fill in."""

    def __init__(self, scratch: Path, data: Path, cache_dir: Path) -> None:
        from peft_engine.models import load_registry
        from tuneq import migrate
        from tuneq.db import make_engine, make_sessionmaker
        from tuneq.settings import Settings

        self.scratch, self.data, self.cache_dir = scratch, data, cache_dir
        self.settings = Settings(home=scratch / "tuneq")
        self.registry_file = scratch / "models.json"
        self.registry_file.write_text(json.dumps({"models": {}}))
        self.registry = load_registry(self.registry_file)
        url = f"sqlite:///{scratch / 'throughput.db'}"
        migrate.upgrade(url)
        self.sessions = make_sessionmaker(make_engine(url))

    def run(self, name: str) -> dict[str, Any]:
        shape = SHAPES[name]
        self._ensure_model(shape.model)
        train, validation = self._files(name, shape)
        spec = {"model": shape.model, "hyperparameters": shape.hyperparameters}
        if shape.method is not None:
            spec["method"] = shape.method
        if validation is None:
            spec["validation_split"] = 0.0  # no validation: nothing held out either
        n_validation = _lines(validation) if validation else "no"
        print(
            f"# {name}: {shape.model}, {_lines(train)} training chats, {n_validation} "
            "validation chats",
            file=sys.stderr,
        )
        job = {"spec": spec, "train": str(train), "validation": validation and str(validation)}
        job |= {"registry": str(self.registry_file), "cache_dir": str(self.cache_dir)}
        run = _in_fresh_process(job, self.scratch / name)
        default = self._estimate(
            spec, train, validation, default_throughput(self.settings, **_key(shape.model))
        )
        measured, own = self._measured(spec, train, validation, shape.model, run["result"])
        row = _row(name, shape.model, run, default, measured, own)
        print(_format_row(row), file=sys.stderr, flush=True)
        return row

    def _ensure_model(self, model: str) -> None:
        """The tiny model built once; SmolLM2 dequantised before any job is timed."""
        from peft_engine.models import load_registry, model_dir

        if model == TINY and TINY not in self.registry:
            directory = _build_tiny_llama(self.scratch / "tiny-llama")
            entry = {"source": {"type": "local", "path": str(directory)}, "tasks": ["causal_lm"]}
            self.registry_file.write_text(json.dumps({"models": {TINY: entry}}))
            self.registry = load_registry(self.registry_file)
        elif model != TINY:
            started = time.monotonic()
            model_dir(self.registry.get(model), self.cache_dir)
            print(
                f"# {model} ready in {time.monotonic() - started:.1f} s (not timed)",
                file=sys.stderr,
            )

    def _files(self, name: str, shape: Shape) -> tuple[Path, Path | None]:
        folder = self.scratch / f"{name}-data"
        folder.mkdir()
        if shape.model == TINY:
            train = _write(folder / "train.jsonl", _generated_chats(shape.n_train, seed=1))
            if shape.n_validation is None:
                return train, None
            return train, _write(
                folder / "validation.jsonl", _generated_chats(shape.n_validation, seed=2)
            )
        dolly = self.data / "dolly"
        for part in ("train.jsonl", "validation.jsonl"):
            if not (dolly / part).is_file():
                sys.exit(f"missing {dolly / part} (real data sets live in ../shared/data)")
        train = _first_lines(dolly / "train.jsonl", folder / "train.jsonl", shape.n_train)
        if shape.n_validation == 0:
            return train, dolly / "validation.jsonl"
        validation = folder / "validation.jsonl"
        if shape.n_validation > _lines(dolly / "validation.jsonl"):
            # the validation file, then the last lines of the train file (after the chats
            # trained on) up to the number wanted: issue 15's 191-example validation file
            held = (dolly / "validation.jsonl").read_text(encoding="utf-8").splitlines()
            tail = (dolly / "train.jsonl").read_text(encoding="utf-8").splitlines()
            more = tail[len(tail) - (shape.n_validation - len(held)) :]
            assert len(tail) - len(more) >= shape.n_train, "validation would overlap training"
            validation.write_text("\n".join(held + more) + "\n", encoding="utf-8")
            return train, validation
        return train, _first_lines(dolly / "validation.jsonl", validation, shape.n_validation)

    def _measured(
        self, spec: dict, train: Path, validation: Path | None, model: str, result: dict
    ) -> tuple[dict[str, Any], bool]:
        """The estimate with the table's figures from earlier runs (own: from this run's),
        recorded as the worker records them."""
        from tuneq.db import transaction

        key = _key(model) | {"method": (spec.get("method") or {}).get("type", "lora")}
        with self.sessions() as db:
            figures = throughput_for(db, settings=self.settings, **key)
        with transaction(self.sessions) as db:
            measured = JobFigures.from_result(result)
            if measured is not None:
                record_job_figures(db, figures=measured, **key)
        own = figures.basis.startswith("default")
        if own:
            with self.sessions() as db:
                figures = throughput_for(db, settings=self.settings, **key)
        return self._estimate(spec, train, validation, figures), own

    def _estimate(self, spec: dict, train: Path, validation: Path | None, figures: Any) -> dict:
        from peft_engine.estimate import estimate_job
        from peft_engine.prepare import DataPaths
        from peft_engine.spec import parse_spec

        estimate = estimate_job(
            parse_spec(spec),
            DataPaths(train, validation),
            registry=self.registry,
            cache_dir=self.cache_dir,
            throughput=figures,
        )
        return estimate.as_dict()


def run_one(job_json: str, workdir: str) -> dict[str, Any]:
    """One job in this process: each step's ETA and time, and the job's wall time."""
    from peft_engine import DataPaths, Hooks, train
    from peft_engine.models import load_registry

    job = json.loads(job_json)
    steps: list[tuple[int, float, float]] = []
    started = time.monotonic()

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if "train_loss" in metrics:
            steps.append((step, time.monotonic() - started, float(metrics["eta_seconds"])))

    done = train(
        job["spec"],
        Path(workdir),
        Hooks(on_metrics=on_metrics),
        data=DataPaths(job["train"], job["validation"]),
        registry=load_registry(Path(job["registry"])),
        cache_dir=Path(job["cache_dir"]),
    )
    wall = time.monotonic() - started
    kept = ("total_steps", "steps", "device", "tokens_per_second", "trained_tokens", "timings")
    return {"steps": steps, "wall_seconds": wall, "result": {k: done.result.get(k) for k in kept}}


def _in_fresh_process(job: dict, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--run", json.dumps(job), str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{job['spec']['model']} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _row(
    name: str, model: str, run: dict, default: dict, measured: dict, own: bool
) -> dict[str, Any]:
    wall, steps = run["wall_seconds"], run["steps"]
    total = run["result"]["total_steps"]
    errors = {"step 1": _eta_error(steps, 1, wall)}
    for share in POINTS:
        errors[f"{share:.0%}"] = _eta_error(steps, max(1, math.ceil(share * total)), wall)
    timings = run["result"].get("timings") or {}
    return {
        "shape": name,
        "model": model,
        "steps": total,
        "evaluations": default["evaluations"],
        "wall_seconds": wall,
        "eta_error_percent": errors,
        "dry_run_default_error_percent": _percent(default["estimated_seconds"], wall),
        "dry_run_measured_error_percent": _percent(measured["estimated_seconds"], wall),
        "measured_from_own_run": own,
        "measured_seconds_by_phase": measured["seconds_by_phase"],
        "eval_share": timings["eval_seconds"] / wall if timings.get("eval_seconds") else None,
    }


def _eta_error(steps: list, step: int, wall: float) -> float | None:
    """The ETA printed at `step` against the time that was left then, in percent."""
    for number, at, eta in steps:
        if number == step:
            return _percent(eta, wall - at)
    return None  # the job stopped early


def _percent(estimate: float, actual: float) -> float | None:
    return 100.0 * (estimate - actual) / actual if actual > 0 else None


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.0f}%"


def _format_row(row: dict) -> str:
    errors = " | ".join(_signed(v) for v in row["eta_error_percent"].values())
    share = "—" if row["eval_share"] is None else f"{row['eval_share']:.0%}"
    mark = "*" if row["measured_from_own_run"] else ""
    return (
        f"| {row['shape']} | {row['steps']} | {row['evaluations']} | "
        f"{row['wall_seconds']:.1f} | {errors} | {_signed(row['dry_run_default_error_percent'])} "
        f"| {_signed(row['dry_run_measured_error_percent'])}{mark} | {share} |"
    )


def _print_table(rows: list[dict]) -> None:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"ETA and dry-run error, (estimate - actual) / actual, on {device}")
    print()
    print(
        "| shape | steps | evaluations | actual s | ETA step 1 | ETA 10% | ETA 25% | ETA 50% "
        "| dry run (default) | dry run (measured) | eval share |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_format_row(row))
    print()
    print("* a model's first run: estimated with its own measured figures")
    print(json.dumps({"device": device, "runs": rows}))


# -- data and the tiny model ------------------------------------------------------------


def _generated_chats(n: int, *, seed: int) -> list[dict]:
    """Sums asked and answered at lengths that vary, as real chats do."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        question = " ".join([f"What is {a} plus {b}?"] * rng.randint(1, 4))
        answer = " ".join([f"{a} plus {b} is {a + b}."] * rng.randint(1, 6))
        messages = [{"role": "user", "content": question}]
        chats.append({"messages": [*messages, {"role": "assistant", "content": answer}]})
    return chats


def _build_tiny_llama(directory: Path) -> Path:
    """A random Llama small enough for seconds a job, large enough that steps take time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _first_lines(source: Path, target: Path, n: int) -> Path:
    with source.open(encoding="utf-8") as rows:
        target.write_text("".join(itertools.islice(rows, n)), encoding="utf-8")
    return target


def _lines(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def _parse() -> argparse.Namespace:
    from peft_engine.training import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=", ".join(SHAPES))
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="holds dolly/*.jsonl")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()), help="model cache")
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
