"""What `auto` buys: each method of the catalogue with nothing set but the model, the task,
the data, the method and `n_epochs`, against a full fine-tune measured in the same run.

    .venv/bin/python bench/quality.py                       # the README's quality table
    .venv/bin/python bench/quality.py --tasks sst2 --methods lora,head_only --sst2-train 5000
    .venv/bin/python bench/quality.py --tasks sst2 --methods lora --no-baseline \\
        --set hyperparameters.learning_rate=1e-3 --set method.r=8   # a sweep's one point

Tasks, on the shared data (../shared/data, or --data-dir):
- sst2: all-MiniLM-L6-v2, seq_classification, a seeded sample of --sst2-train sentences
  (20,000), validation accuracy on all 1,821 validation sentences;
- conll2003: all-MiniLM-L6-v2, token_classification, --conll-train sentences (0: all 14,041),
  entity F1 on all 3,250 validation sentences;
- dolly: SmolLM2-135M-Instruct, causal_lm, --dolly-train chats (0: all 729), n_epochs
  --dolly-epochs ("auto": tuneq's choice, 3 for 729 chats), validation loss on all 100
  validation chats. Its baseline is the base model's loss on that whole set (the engine's
  step-0 evaluation of a one-step job with an explicit cadence); the target is 10% below it,
  with the best checkpoint kept.

The baseline of the two classification tasks is a full fine-tune by the BERT recipe: 5e-5
for the body, batch 32, linear decay after 6% warmup, weight decay 0.01, with the same data,
epochs and pooling, and the new head at 2e-3 (a head at the body's 5e-5 barely trains in
one short epoch: the previous version of this bench had full fine-tuning at entity F1 19 on
1,000 CoNLL sentences). Every other row gives tuneq only
{"model", "task", "method": {"type"}, "hyperparameters": {"n_epochs"}} (plus any --set), so
learning rates (per part), batch size, warmup, schedule, ranks, targets, pooling and the
evaluation cadence are all tuneq's `auto`. The metric is that of the weights tuneq keeps
(`metrics.kept`: the best checkpoint's, on the whole validation set).

Each run is a fresh process (its peak memory its own); `--jobs N` runs N side by side and
`--threads T` gives each T threads (on a small CPU, one thread a run and a run a core is
the most work an hour: a 22M-parameter encoder gains little from a second thread). Rows
print as they finish; the table at the end is in order, and its last line is every figure
as one JSON object. Nothing here is timed against a threshold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
ENCODER, DECODER = "all-minilm-l6-v2", "smollm2-135m-instruct"
METHODS = (
    "lora",
    "head_only",
    "full",
    "adalora",
    "bitfit",
    "bottleneck_adapter",
    "ia3",
    "layerwise_unfreeze",
    "loha",
    "lokr",
    "oft",
    "vera",
    "prompt_tuning",
    "p_tuning",
    "prefix_tuning",
)
# task name -> (data folder, model, tuneq task, metric, higher is better)
TASKS = {
    "sst2": ("sst2", ENCODER, "seq_classification", "accuracy", True),
    "conll2003": ("conll2003", ENCODER, "token_classification", "entity_f1", True),
    "dolly": ("dolly", DECODER, "causal_lm", "eval_loss", False),
}
BASELINE = "full (baseline)"
BASE_MODEL = "base model"  # causal_lm's baseline: the untrained model on the whole set
BASELINES = {BASELINE: "baseline", BASE_MODEL: "base model"}
PLAIN_FULL = {
    "batch_size": 32,
    "learning_rate": 5e-5,
    "head_learning_rate": 2e-3,
    "lr_scheduler": "linear",
    "warmup_ratio": 0.06,
    "weight_decay": 0.01,
}


def main() -> None:
    args = _parse()
    if args.run:
        print(json.dumps(run_one(json.loads(args.run[0]), Path(args.run[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="tuneq-quality-") as scratch:
        jobs = [job for name in args.tasks.split(",") for job in _jobs(name, args, Path(scratch))]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process
            futures = [pool.submit(_in_fresh_process, job, args.threads) for job in jobs]
            rows: list[dict] = []
            for future in as_completed(futures):
                rows.append(future.result())
                print(_format_row(rows[-1], rows), file=sys.stderr, flush=True)
    order = {job["workdir"]: index for index, job in enumerate(jobs)}
    _print_table(sorted(rows, key=lambda row: order[row["workdir"]]), args)


def _jobs(name: str, args: argparse.Namespace, scratch: Path) -> list[dict]:
    """The runs of one task: the baseline first, then each method that supports the task."""
    folder, model, task, metric, _ = TASKS[name]
    size = {"sst2": args.sst2_train, "conll2003": args.conll_train}.get(name, args.dolly_train)
    train, validation = _subset(Path(args.data_dir) / folder, size, scratch, args)
    methods = [m for m in args.methods.split(",") if _supports(m, task)]
    if not args.no_baseline:
        methods = [BASE_MODEL if task == "causal_lm" else BASELINE, *methods]
    epochs = args.dolly_epochs if task == "causal_lm" else args.epochs
    return [
        {
            "name": name,
            "model": model,
            "task": task,
            "metric": metric,
            "method": method,
            "train": str(train),
            "validation": str(validation),
            "epochs": epochs,
            "seed": args.seed,
            "set": args.set,
            "workdir": str(scratch / f"{name}-{index}"),
        }
        for index, method in enumerate(methods)
    ]


def run_one(job: dict, workdir: Path) -> dict:
    """One training run in this process: the figures of its output."""
    from peft_engine import DataPaths, train

    spec = _spec(job)
    result = train(spec, workdir, data=DataPaths(job["train"], job["validation"]))
    out = result.result
    trainable = sum(  # an encoder's pooler trains with `full` but no task head uses it
        p.numel()
        for name, p in result.model.named_parameters()
        if p.requires_grad and "pooler" not in name.split(".")
    )
    total = _base_parameters(job["model"], out["labels"], job["task"])
    metric = job["metric"]
    kept = out["metrics"]["kept"] or out["metrics"]["best"]
    if job["method"] == BASE_MODEL:  # its step-0 evaluation, on the whole set
        kept, trainable, out["steps"] = out["metrics"]["initial"], 0, 0
    hp = out["spec"]["hyperparameters"]
    return {
        "task": job["name"],
        "method": job["method"],
        "workdir": job["workdir"],
        "metric": metric,
        "score": kept[metric],
        "initial": out["metrics"]["initial"].get(metric),
        "trainable_params": trainable,
        "base_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "train_examples": out["train_examples"],
        "validation_examples": out["validation_examples"],
        # what `score` was measured on: the whole set, or the plan's sample when eval_budget
        # left no room for a whole-set pass (tuneq's own choice, reported as it is)
        "scored_examples": out["validation_examples"]
        if job["method"] == BASE_MODEL
        or hp["eval_sample_size"] is None
        or hp["final_eval_whole_set"]
        else hp["eval_sample_size"],
        "steps": out["steps"],
        "best_step": out["best_step"],
        "early_stopped": out["early_stopped"],
        "resolved": {k: hp[k] for k in ("batch_size", "learning_rate", "warmup_steps")}
        | {k: hp.get(k) for k in ("head_learning_rate", "pooling", "lr_scheduler")},
        "method_spec": out["spec"]["method"],
        "wall_seconds": out["wall_seconds"],
        "timings": out["timings"],
        "peak_rss_bytes": out["peak_memory_bytes"],
    }


def _spec(job: dict) -> dict:
    hyperparameters: dict = {"seed": job["seed"]}
    if job["epochs"] != "auto":
        hyperparameters["n_epochs"] = int(job["epochs"])
    method: dict = {"type": job["method"]}
    if job["method"] == BASELINE:
        method = {"type": "full"}
        hyperparameters |= PLAIN_FULL
    elif job["method"] == BASE_MODEL:  # one step, to have the engine evaluate step 0 whole
        method = {"type": "lora"}
        hyperparameters |= {"max_steps": 1, "eval_every_steps": 1}
    spec = {
        "model": job["model"],
        "task": job["task"],
        "method": method,
        "hyperparameters": hyperparameters,
    }
    for assignment in job["set"] or []:
        key, _, raw = assignment.partition("=")
        part, _, field = key.partition(".")
        if part not in ("method", "hyperparameters") or not field:
            raise SystemExit(f"--set {assignment}: method.FIELD=VALUE or hyperparameters.FIELD=")
        spec[part][field] = json.loads(raw) if raw[:1] in '[{0123456789-tfn"' else raw
    return spec


def _supports(method: str, task: str) -> bool:
    from peft_engine.methods import METHODS as CATALOGUE

    return method in BASELINES or task in CATALOGUE[method].tasks


def _base_parameters(model: str, labels: list[str] | None, task: str) -> int:
    """The base model's parameters, with its new head: what the shares are shares of."""
    from safetensors import safe_open
    from transformers import AutoConfig

    from peft_engine.models import load_registry, model_dir
    from peft_engine.training import default_cache_dir

    folder = model_dir(load_registry().get(model), default_cache_dir())
    count = 0
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(str(file), "pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (no __iter__); a task head uses no pooler
                if task == "causal_lm" or not key.startswith("pooler."):
                    count += math.prod(weights.get_slice(key).get_shape())
    if labels and task != "causal_lm":
        count += len(labels) * (AutoConfig.from_pretrained(folder).hidden_size + 1)
    return count


def _in_fresh_process(job: dict, threads: int) -> dict:
    command = [sys.executable, __file__, "--run", json.dumps(job), job["workdir"]]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{job['method']} on {job['name']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _subset(folder: Path, size: int, scratch: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    train, validation = folder / "train.jsonl", folder / "validation.jsonl"
    for path in (train, validation):
        if not path.is_file():
            raise SystemExit(f"missing {path} (real data sets live in ../shared/data)")
    lines = train.read_text(encoding="utf-8").splitlines()
    if size and size < len(lines):
        lines = random.Random(args.seed).sample(lines, size)
    subset = scratch / f"{folder.name}-train-{len(lines)}.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return subset, validation


def _format_row(row: dict, rows: list[dict]) -> str:
    better = TASKS[row["task"]][4]
    baseline = next(
        (r for r in rows if r["task"] == row["task"] and r["method"] in BASELINES), None
    )
    if baseline is not None:
        base, base_name = baseline["score"], BASELINES[baseline["method"]]
    else:
        base, base_name = row["initial"], "base model"
    if row["metric"] == "eval_loss":
        score = f"loss {row['score']:.4f}"
        versus = f"{base_name} {base:.4f} ({100 * (row['score'] / base - 1):+.1f}%)"
    else:
        score = f"{row['metric']} {100 * row['score']:.2f}"
        delta = 100 * (row["score"] - base) * (1 if better else -1)
        versus = f"{base_name} {100 * base:.2f} ({delta:+.2f})"
    if row["scored_examples"] < row["validation_examples"]:
        score += f" (a sample of {row['scored_examples']})"
    return (
        f"| {row['task']} | {row['method']} | {row['trainable_params']:,} "
        f"({row['trainable_percent']:.2f}%) | {score} | {versus} | {row['steps']} "
        f"(best {row['best_step']}) | {row['wall_seconds']:.0f} s |"
    )


def _print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"sst2/conll2003 {args.epochs} epoch(s), dolly n_epochs {args.dolly_epochs}, seed "
        f"{args.seed}; training examples: "
        + ", ".join(
            f"{t} {next(r['train_examples'] for r in rows if r['task'] == t)}"
            for t in dict.fromkeys(r["task"] for r in rows)
        )
    )
    print()
    print("| task | method | trainable (share) | kept weights | vs baseline | steps | wall |")
    print("|---|---|---|---|---|---|---|")
    for index, row in enumerate(rows):
        print(_format_row(row, rows[: index + 1]))
    print()
    print(json.dumps({"epochs": args.epochs, "seed": args.seed, "set": args.set, "runs": rows}))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--tasks", default="sst2,conll2003,dolly")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sst2-train", type=int, default=20_000)
    parser.add_argument("--conll-train", type=int, default=0, help="0: the whole train set")
    parser.add_argument("--dolly-train", type=int, default=0, help="0: the whole train file")
    parser.add_argument("--epochs", type=int, default=1, help="sst2 and conll2003")
    parser.add_argument("--dolly-epochs", default="auto", help="a number, or auto (3 here)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run")
    parser.add_argument(
        "--set", action="append", metavar="PART.FIELD=VALUE", help="e.g. method.r=8 (repeatable)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side")
    parser.add_argument("--threads", type=int, default=0, help="threads a run (0: torch's)")
    parser.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
