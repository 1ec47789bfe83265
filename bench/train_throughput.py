"""Training throughput and memory: tuneq's engine against the usual Trainer + peft recipes.

    .venv/bin/python bench/train_throughput.py                  # the README's table
    .venv/bin/python bench/train_throughput.py --steps 4 --batch 4 --data my-chat.jsonl

The same model (SmolLM2-135M-Instruct from the registry), the same chat examples in the
same order, the same LoRA (r=16, alpha=32, dropout 0.05, every linear layer), batch, steps
and optimizer (AdamW, constant learning rate, gradient clipping at 1.0), each recipe in
its own fresh process, one after the other in this run:

  1. maxlen        transformers `Trainer` + peft, every example padded to the same length:
                   the longest example's (at most --max-length), the least padding that
                   recipe can use
  2. padding_free  transformers `Trainer` + peft, `DataCollatorWithFlattening` (examples
                   side by side in one row, position ids restart per example)
  3. tuneq         `peft_engine.train` with its defaults for this job

Every recipe trains on the same tokens: the engine's own tokenisation (chat template, loss
on the assistant's tokens only) is handed to the Trainer recipes as `input_ids`/`labels`.
Throughput is real (non-padding) tokens per second over the steps after the first (the
first step pays for allocator warm-up and lazy initialisation in every recipe alike); peak
memory is the process's peak RSS (VmHWM), model loading included.

The roof is measured here too: the same fp32 matmuls that one training step of this model
runs (every linear layer's forward and input-gradient products, at this run's token count
per row), timed; divided by the FLOPs one trained token costs (4 x the linear parameters,
the LM head included: forward plus the input gradient, frozen weights get no weight
gradient), it gives the tokens/s this machine could reach if the step were nothing but
those matmuls.

Data: ../shared/data/dolly/train.jsonl beside the repository, or --data (chat JSONL).
The last line is one JSON object with the figures and the ratios. Nothing here is asserted
against a threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dolly" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
RECIPES = ("maxlen", "padding_free", "tuneq")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def main() -> None:
    args = _parse_args()
    if args.child:
        result = _child(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    data = Path(args.data)
    if not data.is_file():
        sys.exit(f"no data: {data} is missing (give a chat JSONL file with --data)")
    n_examples = args.batch * args.steps
    with tempfile.TemporaryDirectory(prefix="tuneq-bench-") as tmp:
        subset = Path(tmp) / "train.jsonl"
        lines = _first_lines(data, n_examples)
        if len(lines) < n_examples:
            sys.exit(f"{data} has {len(lines)} lines; {n_examples} are needed")
        subset.write_text("".join(lines), encoding="utf-8")
        print(
            f"SmolLM2-135M-Instruct, LoRA r={LORA['r']} on all linear layers, fp32, "
            f"{args.steps} steps of {args.batch} examples ({data.name}, first {n_examples} "
            f"lines), max length {args.max_length}, torch threads {args.threads or 'default'}",
            flush=True,
        )
        results: dict[str, dict[str, Any]] = {}
        for recipe in ["roof", *args.recipes]:
            results[recipe] = _run_child(args, recipe, subset, Path(tmp))
    _report(args, results)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="chat JSONL")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--recipes", default=",".join(RECIPES), type=lambda s: s.split(","))
    parser.add_argument("--child", choices=["roof", *RECIPES], help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--row-tokens", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def _first_lines(path: Path, n: int) -> list[str]:
    lines: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line if line.endswith("\n") else line + "\n")
            if len(lines) == n:
                break
    return lines


def _run_child(args: argparse.Namespace, recipe: str, subset: Path, tmp: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        recipe,
        "--train-file",
        str(subset),
        "--workdir",
        str(tmp / recipe),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--max-length",
        str(args.max_length),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    started = time.monotonic()
    process = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if process.returncode != 0:
        sys.stderr.write(process.stdout[-4000:] + process.stderr[-4000:])
        sys.exit(f"recipe {recipe} failed (exit {process.returncode})")
    line = next(x for x in process.stdout.splitlines()[::-1] if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["process_seconds"] = time.monotonic() - started
    print(f"  {recipe}: done in {result['process_seconds']:.0f} s", flush=True)
    return result


# -- the child processes -------------------------------------------------------------------


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "roof":
        return _roof(args)
    if args.child == "tuneq":
        result = _tuneq(args)
    else:
        result = _trainer(args, padding_free=args.child == "padding_free")
    result["peak_rss_bytes"] = _peak_rss()
    result["threads"] = torch.get_num_threads()
    return result


def _model_dir() -> Path:
    from peft_engine.models import load_registry
    from peft_engine.models.loading import model_dir
    from peft_engine.training import default_cache_dir

    cache = Path(os.environ.get("TUNEQ_CACHE_DIR") or default_cache_dir())
    path = model_dir(load_registry().get(MODEL), cache)
    assert path is not None
    return path


def _ordered_examples(args: argparse.Namespace) -> tuple[list[Any], Any]:
    """The engine's tokenisation of the subset, in the engine's order for epoch 0."""
    from peft_engine.data.batching import epoch_order
    from peft_engine.data.formats import read_examples
    from peft_engine.data.tokenize import tokenize_dataset
    from peft_engine.models import load_tokenizer

    tokenizer = load_tokenizer(_model_dir())
    examples = read_examples(Path(args.train_file))
    tokenized = tokenize_dataset(
        examples, tokenizer, max_seq_length=args.max_length, train_on_inputs=False
    ).examples
    order = epoch_order(len(tokenized), seed=args.seed, epoch=0)
    return [tokenized[i] for i in order], tokenizer


def _trainer(args: argparse.Namespace, *, padding_free: bool) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    examples, tokenizer = _ordered_examples(args)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(
        _model_dir(), dtype=torch.float32, attn_implementation="sdpa"
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    # Trainer labels are the tokens themselves (the model shifts them); the engine's
    # targets are already shifted: labels[i + 1] = targets[i].
    real_tokens = [len(e.input_ids) for e in examples]
    width = max(real_tokens)  # the longest example (at most --max-length): the least padding
    rows = []
    for e in examples:
        labels = [-100, *e.targets[:-1]]
        if padding_free:
            rows.append({"input_ids": e.input_ids, "labels": labels})
        else:
            pad = width - len(e.input_ids)
            rows.append(
                {
                    "input_ids": e.input_ids + [tokenizer.pad_token_id] * pad,
                    "attention_mask": [1] * len(e.input_ids) + [0] * pad,
                    "labels": labels + [-100] * pad,
                }
            )
    timer = _StepTimer(real_tokens, args.batch)

    class Timing(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            timer.begin()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            timer.end()

        def on_log(self, _args: Any, state: Any, control: Any, logs: Any = None, **k: Any) -> None:
            if logs and "loss" in logs:
                timer.losses.append(float(logs["loss"]))

    class InOrder(Trainer):  # the engine's order, so both see the same batches
        def _get_train_sampler(self, *a: Any, **k: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    training_args = TrainingArguments(
        output_dir=args.workdir,
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
    )
    collator = DataCollatorWithFlattening() if padding_free else default_data_collator
    trainer = InOrder(
        model=model,
        args=training_args,
        train_dataset=_ListDataset(rows),
        data_collator=collator,
        callbacks=[Timing()],
    )
    trainer.train()
    return timer.summary()


class _ListDataset:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


class _StepTimer:
    """Per-step wall time and real tokens, the first step left out of the rate."""

    def __init__(self, real_tokens: list[int], batch: int) -> None:
        self.step_tokens = [
            sum(real_tokens[i : i + batch]) for i in range(0, len(real_tokens), batch)
        ]
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self._started = 0.0

    def begin(self) -> None:
        self._started = time.perf_counter()

    def end(self) -> None:
        self.seconds.append(time.perf_counter() - self._started)

    def summary(self) -> dict[str, Any]:
        return _summary(self.step_tokens[: len(self.seconds)], self.seconds, self.losses)


def _summary(tokens: list[int], seconds: list[float], losses: list[float]) -> dict[str, Any]:
    timed = slice(1, None) if len(seconds) > 1 else slice(None)
    return {
        "tokens_per_second": sum(tokens[timed]) / sum(seconds[timed]),
        "step_seconds": seconds,
        "step_tokens": tokens,
        "losses": losses,
        "final_loss": losses[-1],
    }


def _tuneq(args: argparse.Namespace) -> dict[str, Any]:
    import peft_engine
    from peft_engine.hooks import Hooks

    seconds: list[float] = []
    tokens: list[int] = []
    losses: list[float] = []

    def on_metrics(step: int, metrics: dict[str, float]) -> None:
        if "train_loss" in metrics:
            losses.append(metrics["train_loss"])
            step_tokens = round(metrics["trained_tokens"]) - sum(tokens)
            tokens.append(step_tokens)
            seconds.append(step_tokens / metrics["tokens_per_second"])

    spec = {
        "model": MODEL,
        "training_file": args.train_file,
        "validation_split": 0.0,
        "method": {"type": "lora", **LORA},
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "max_seq_length": args.max_length,
            "max_steps": args.steps,
            "seed": args.seed,
        },
    }
    peft_engine.train(spec, Path(args.workdir), Hooks(on_metrics=on_metrics))
    return _summary(tokens, seconds, losses)


def _roof(args: argparse.Namespace) -> dict[str, Any]:
    """Time the step's linear-layer matmuls (forward and input gradient) at fp32."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_model_dir())
    examples, _ = _ordered_examples(args)
    row = max(
        sum(len(e.input_ids) for e in examples[i : i + args.batch])
        for i in range(0, len(examples), args.batch)
    )
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * config.num_key_value_heads
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    shapes = layer * config.num_hidden_layers + [(h, v)]
    params = sum(a * b for a, b in shapes)
    torch.manual_seed(0)
    weights = {s: torch.randn(s[1], s[0]) * 0.02 for s in set(shapes)}
    # The best rate of two row counts: the whole packed row (as the Trainer recipes run it)
    # and the engine's 512-token pieces; the roof is the faster.
    rates = {rows: _matmul_rate(shapes, weights, rows) for rows in sorted({row, 512})}
    rows = max(rates, key=rates.__getitem__)
    flops_per_token = 4 * params
    gflops = rates[rows] / 1e9
    return {
        "rows": rows,
        "gflops_by_rows": {str(r): round(v / 1e9, 1) for r, v in rates.items()},
        "linear_params": params,
        "gflop_per_token": flops_per_token / 1e9,
        "gflops": gflops,
        "tokens_per_second": gflops * 1e9 / flops_per_token,
        "threads": torch.get_num_threads(),
    }


def _matmul_rate(
    shapes: list[tuple[int, int]], weights: dict[tuple[int, int], Any], rows: int
) -> float:
    """FLOP/s of one step's linear matmuls (forward and input gradient) at `rows` tokens."""
    import torch

    sizes = {n for shape in shapes for n in shape}
    x = {n: torch.randn(rows, n) for n in sizes}

    def one_step() -> None:
        for a, b in shapes:
            torch.nn.functional.linear(x[a], weights[(a, b)])  # forward
            x[b] @ weights[(a, b)]  # input gradient

    one_step()  # warm-up
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        one_step()
        best = min(best, time.perf_counter() - started)
    return 4 * sum(a * b for a, b in shapes) * rows / best


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# -- the report ----------------------------------------------------------------------------


def _report(args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> None:
    roof = results["roof"]
    reference = results.get("padding_free")
    print()
    print(
        f"roof: {roof['gflops']:.1f} GFLOP/s on this run's matmuls ({roof['rows']} tokens a row, "
        f"{roof['threads']} threads) / {roof['gflop_per_token']:.3f} GFLOP a token = "
        f"{roof['tokens_per_second']:.0f} tokens/s"
    )
    print()
    print(
        "| recipe | real tokens/s | vs maxlen | vs padding-free | of roof | peak RSS | "
        "final loss | loss vs padding-free |"
    )
    print("|---|---|---|---|---|---|---|---|")
    names = {
        "maxlen": "Trainer + peft, max-length padding",
        "padding_free": "Trainer + peft, padding-free",
        "tuneq": "tuneq engine",
    }
    for recipe in args.recipes:
        r = results[recipe]
        tps = r["tokens_per_second"]
        vs_max = tps / results["maxlen"]["tokens_per_second"] if "maxlen" in results else None
        vs_free = tps / reference["tokens_per_second"] if reference else None
        loss_diff = (r["final_loss"] / reference["final_loss"] - 1) if reference else None
        print(
            f"| {names[recipe]} | {tps:.1f} | {_x(vs_max)} | {_x(vs_free)} | "
            f"{tps / roof['tokens_per_second']:.0%} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['final_loss']:.4f} | {_pct(loss_diff)} |"
        )
    figures: dict[str, Any] = {
        "roof_tokens_per_second": round(roof["tokens_per_second"], 1),
        "roof_gflops": round(roof["gflops"], 1),
    }
    for recipe in args.recipes:
        r = results[recipe]
        figures[f"{recipe}_tokens_per_second"] = round(r["tokens_per_second"], 2)
        figures[f"{recipe}_peak_rss_gib"] = round(r["peak_rss_bytes"] / 2**30, 3)
        figures[f"{recipe}_final_loss"] = round(r["final_loss"], 5)
    if {"maxlen", "padding_free", "tuneq"} <= set(results):
        ours, free, maxlen = results["tuneq"], results["padding_free"], results["maxlen"]
        figures.update(
            ratio_vs_maxlen=round(ours["tokens_per_second"] / maxlen["tokens_per_second"], 3),
            ratio_vs_padding_free=round(ours["tokens_per_second"] / free["tokens_per_second"], 3),
            roof_fraction=round(ours["tokens_per_second"] / roof["tokens_per_second"], 3),
            memory_ratio_vs_padding_free=round(ours["peak_rss_bytes"] / free["peak_rss_bytes"], 3),
            final_loss_rel_diff=round(abs(ours["final_loss"] / free["final_loss"] - 1), 5),
        )
    print()
    print(json.dumps(figures))


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:+.2%}"


if __name__ == "__main__":
    main()
