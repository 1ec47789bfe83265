"""Quality of the method catalogue on real data: SST-2 sentiment and CoNLL-2003 NER.

    .venv/bin/python bench/quality.py                      # the README's table
    .venv/bin/python bench/quality.py --methods lora,full --sst2-train 2000

Fine-tunes all-MiniLM-L6-v2 (the `all-minilm-l6-v2` built-in, mean pooling) with `full`,
`lora`, `adalora`, `head_only`, `bottleneck_adapter`, `layerwise_unfreeze` and
`prefix_tuning` on a seeded subset of each training set (sizes printed), evaluating on the
whole validation set; each run in a fresh process, so its peak memory is its own. Prints
one table (method, trainable parameters and their share of the base model, validation
accuracy / entity F1 of the kept weights, wall time, peak RSS) and, as its last line, the
same figures as one JSON object.

Data: ../shared/data/sst2 and ../shared/data/conll2003 beside the repository (or
--data-dir). Nothing here is timed against a threshold; the target it reports on is
LoRA within 1 point of full fine-tuning at under 3% of the parameters.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
MODEL = "all-minilm-l6-v2"
METHODS = (
    "full",
    "lora",
    "adalora",
    "head_only",
    "bottleneck_adapter",
    "layerwise_unfreeze",
    "prefix_tuning",
)
TASKS = {
    "sst2": ("seq_classification", "accuracy"),
    "conll2003": ("token_classification", "entity_f1"),
}
# Per method: its spec and learning rate, the same for both tasks.
SETTINGS: dict[str, tuple[dict, float]] = {
    "full": ({"type": "full"}, 5e-5),
    "lora": ({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1}, 1e-3),
    "adalora": ({"type": "adalora", "init_r": 12, "target_r": 8, "alpha": 16}, 1e-3),
    "head_only": ({"type": "head_only"}, 5e-3),
    "bottleneck_adapter": ({"type": "bottleneck_adapter", "bottleneck": 64}, 1e-3),
    "layerwise_unfreeze": (
        {"type": "layerwise_unfreeze", "direction": "top_down", "discriminative_lr": 2.6},
        1e-4,
    ),
    "prefix_tuning": ({"type": "prefix_tuning", "num_virtual_tokens": 20}, 5e-3),
}


def main() -> None:
    args = _parse()
    if args.run:
        print(json.dumps(run_one(*args.run)))
        return
    data_dir = Path(args.data_dir)
    methods = args.methods.split(",")
    sizes = {"sst2": args.sst2_train, "conll2003": args.conll_train}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneq-quality-") as scratch:
        for name, (task, metric) in TASKS.items():
            train, validation = _subset(data_dir / name, sizes[name], Path(scratch), args.seed)
            print(
                f"# {name}: {sizes[name]} training examples (seed {args.seed}), "
                f"validation: all of {validation.name}",
                file=sys.stderr,
            )
            for method in methods:
                job = {
                    "task": task,
                    "method": method,
                    "train": str(train),
                    "validation": str(validation),
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "seed": args.seed,
                }
                workdir = Path(scratch) / f"{name}-{method}"
                row = _in_fresh_process(job, workdir)
                row |= {"dataset": name, "metric": metric}
                rows.append(row)
                print(_format_row(row), file=sys.stderr, flush=True)
    _print_table(rows, sizes, args)


def run_one(job_json: str, workdir: str) -> dict:
    """One training run in this process: the figures of its output."""
    from peft_engine import DataPaths, train

    job = json.loads(job_json)
    spec_method, learning_rate = SETTINGS[job["method"]]
    spec = {
        "model": MODEL,
        "task": job["task"],
        "method": spec_method,
        "hyperparameters": {
            "n_epochs": job["epochs"],
            "batch_size": job["batch_size"],
            "learning_rate": learning_rate,
            "lr_scheduler": "linear",
            "warmup_ratio": 0.06,
            "max_seq_length": 128,
            "pooling": "mean",
            "early_stopping": None,
            "seed": job["seed"],
        },
    }
    if job["task"] != "seq_classification":
        del spec["hyperparameters"]["pooling"]
    # two evaluations (and checkpoints) a run, half-way and at the end, on the whole set
    n_train = len(Path(job["train"]).read_text(encoding="utf-8").splitlines())
    steps = -(-n_train // job["batch_size"]) * job["epochs"]
    spec["hyperparameters"]["eval_every_steps"] = max(1, steps // 2)
    started = time.monotonic()
    result = train(spec, Path(workdir), data=DataPaths(job["train"], job["validation"]))
    wall = time.monotonic() - started
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    base_params = _base_parameters(len(result.result["labels"]))
    best = result.result["metrics"]["best"]
    metric = "accuracy" if job["task"] == "seq_classification" else "entity_f1"
    return {
        "method": job["method"],
        "trainable_params": trainable,
        "base_params": base_params,
        "trainable_percent": 100.0 * trainable / base_params,
        "score": best[metric],
        "macro_f1": best.get("macro_f1"),
        "best_step": result.result["best_step"],
        "steps": result.result["steps"],
        "wall_seconds": wall,
        "peak_rss_bytes": result.result["peak_memory_bytes"],
    }


def _base_parameters(n_labels: int) -> int:
    """The base model's parameters with its new head: what the shares are shares of."""
    from transformers import AutoModel

    from peft_engine.models import load_registry, model_dir

    body = AutoModel.from_pretrained(
        model_dir(load_registry().get(MODEL), Path.home() / ".cache" / "tuneq"),
        add_pooling_layer=False,
    )
    hidden = body.config.hidden_size
    return sum(p.numel() for p in body.parameters()) + n_labels * (hidden + 1)


def _in_fresh_process(job: dict, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--run", json.dumps(job), str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{job['method']} on {job['task']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _subset(folder: Path, size: int, scratch: Path, seed: int) -> tuple[Path, Path]:
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    for path in (train, validation):
        if not path.is_file():
            raise SystemExit(f"missing {path} (real data sets live in ../shared/data)")
    lines = train.read_text(encoding="utf-8").splitlines()
    chosen = random.Random(seed).sample(lines, min(size, len(lines)))
    subset = scratch / f"{folder.name}-train-{len(chosen)}.jsonl"
    subset.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return subset, validation


def _format_row(row: dict) -> str:
    return (
        f"| {row['dataset']} | {row['method']} | {row['trainable_params']:,} "
        f"({row['trainable_percent']:.2f}%) | {row['metric']} {100 * row['score']:.2f} | "
        f"{row['wall_seconds']:.0f} s | {row['peak_rss_bytes'] / 2**30:.2f} GiB |"
    )


def _print_table(rows: list[dict], sizes: dict, args: argparse.Namespace) -> None:
    print(
        f"all-MiniLM-L6-v2, {args.epochs} epochs, batch {args.batch_size}; SST-2: "
        f"{sizes['sst2']} training phrases, 1,821 validation sentences; CoNLL-2003: "
        f"{sizes['conll2003']} training sentences, 3,250 validation sentences"
    )
    print()
    print("| data | method | trainable parameters | validation | wall | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(_format_row(row))
    print()
    summary: dict = {"model": MODEL, "epochs": args.epochs, "sizes": sizes, "runs": rows}
    for dataset in TASKS:
        by_method = {r["method"]: r for r in rows if r["dataset"] == dataset}
        if "lora" in by_method and "full" in by_method:
            gap = 100 * (by_method["full"]["score"] - by_method["lora"]["score"])
            summary[f"{dataset}_lora_gap_points"] = round(gap, 2)
            summary[f"{dataset}_lora_trainable_percent"] = round(
                by_method["lora"]["trainable_percent"], 3
            )
    print(json.dumps(summary))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sst2-train", type=int, default=2000)
    parser.add_argument("--conll-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
