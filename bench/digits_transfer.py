"""Does a pretrained image backbone transfer? scikit-learn's digits, with the engine itself.

    .venv/bin/python bench/digits_transfer.py [--train-per-class 20] [--seeds 0,1,2,3,4]

The experiment (CPU, about five minutes on one thread):
1. Pretrain, once: a small MobileNetV2 (from config, random init, depth multiplier 0.5) is
   trained with method `full` on digits 0-4 (80% of each digit to train, 20% to validate),
   as a job of task image_classification. Its trained body is saved as a model directory
   (with its image processor) and registered as the "pretrained" base model.
2. Transfer, once per seed: digits 5-9, a small training set (`--train-per-class` images of
   each digit, drawn by the seed: transfer matters most with little data) and every other
   5-9 image for validation. Compared, with the same epochs, batch size, schedule and seed:
   - head_only: the pretrained body frozen, only the new linear head trains;
   - lora: LoRA (r=8) on the body's 1x1 convolutions, plus the head;
   - full: every parameter of the pretrained model trains;
   - scratch: every parameter of the random model pretraining started from trains.
   Learning rates are per method, fixed beforehand (not tuned on the validation data):
   LEARNING_RATES. Each run is evaluated once, at its end (no step is chosen on the
   validation data). Figures are the mean and standard deviation over the seeds: with 100
   training images one seed's split moves accuracy by a few points.

The digits (UCI's, CC BY 4.0; scikit-learn's copy, shipped as tuneq/demo/data/digits.csv.gz)
are 8x8 (values 0..16), scaled to 32x32 grayscale PNGs; the image processor
resizes to 32 and normalises. One table, then one JSON line with the figures: per method
trainable parameters (count and % of the model), validation accuracy and macro-F1 (mean,
sd, per seed), wall seconds and the ratio to scratch's.

Torch runs on one thread by default (`--threads`): on a small shared machine two OpenMP
threads fighting other processes for two cores made steps 10-50x slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_engine import DataPaths  # noqa: E402
from tuneq.image_model import (  # noqa: E402
    PRETRAIN_BATCH_SIZE,
    PRETRAIN_EPOCHS,
    PRETRAIN_LEARNING_RATE,
    RANDOM_MODEL,
    Digit,
    image_folders,
    job_spec,
    pretrain_split,
    random_model_dir,
    run_job,
    save_body,
    transfer_split,
    write_registry,
)
from tuneq.image_model import pretrain as pretrain_model  # noqa: E402

# MobileNetV2's 1x1 convolutions (peft's LoRA adapts nn.Conv2d; the 3x3 ones are depthwise).
CONV_TARGETS = ["expand_1x1.convolution", "reduce_1x1.convolution", "conv_1x1.convolution"]
LEARNING_RATES = {
    "pretrain": PRETRAIN_LEARNING_RATE,
    "head_only": 1e-2,
    "lora": 5e-3,
    "full": 2e-3,
    "scratch": 2e-3,
}
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "head_only": {"type": "head_only"},
    "lora": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": CONV_TARGETS},
    "full": {"type": "full"},
    "scratch": {"type": "full"},
}
PRETRAINED_MODEL = "digits-pretrained"


@dataclasses.dataclass(frozen=True)
class Run:
    """One transfer run's figures."""

    method: str
    seed: int
    trainable: int
    accuracy: float
    macro_f1: float
    wall_seconds: float


# ---------------------------------------------------------------------------------------
# Data, models and runs (the pieces are tuneq/image_model.py's, which builds the same
# pretrained model for `tuneq admin build-image-model`)
# ---------------------------------------------------------------------------------------


def folders(root: Path, split: tuple[list[Digit], list[Digit]]) -> tuple[DataPaths, dict[str, int]]:
    """Image folders of a (train, validation) split, and how many images each holds."""
    train, validation = split
    return image_folders(root, train, validation), {
        "train": len(train),
        "validation": len(validation),
    }


def pretrain(
    data: DataPaths, root: Path, registry: Any, args: argparse.Namespace
) -> tuple[Path, dict[str, Any]]:
    """Train the random model on digits 0-4 (batch norm statistics measured again over its
    training images: `tuneq.image_model.pretrain`); save its trained body as a model
    directory."""
    model, figures = pretrain_model(
        data,
        root,
        registry,
        epochs=args.pretrain_epochs,
        batch_size=args.pretrain_batch_size,
        seed=0,
    )
    return save_body(model, root / "models" / "pretrained"), figures


def transfer(
    seed: int, root: Path, registry: Any, args: argparse.Namespace
) -> tuple[list[Run], int, dict[str, int]]:
    """One seed's four runs; the model's parameter count; the data's sizes."""
    data, sizes = folders(root / "data", transfer_split(seed, args.train_per_class))
    runs, model_size = [], 0
    for name, method in METHOD_SPECS.items():
        model = RANDOM_MODEL if name == "scratch" else PRETRAINED_MODEL
        spec = job_spec(
            model,
            method,
            LEARNING_RATES[name],
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
        )
        result = run_job(spec, data, root / "runs" / name, registry, root / "cache")
        if name == "full":  # every parameter trains: the model's size
            model_size = sum(p.numel() for p in result.model.parameters())
        final = result.result["metrics"]["final"]
        runs.append(
            Run(
                method=name,
                seed=seed,
                trainable=sum(p.numel() for p in result.model.parameters() if p.requires_grad),
                accuracy=final["accuracy"],
                macro_f1=final["macro_f1"],
                wall_seconds=result.result["wall_seconds"],
            )
        )
    return runs, model_size, sizes


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def aggregate(runs: list[Run], model_size: int) -> dict[str, dict[str, Any]]:
    """Per method: trainable parameters, and accuracy, macro-F1 and wall time over seeds."""
    scratch = {r.seed: r for r in runs if r.method == "scratch"}
    figures = {}
    for name in METHOD_SPECS:
        mine = [r for r in runs if r.method == name]
        accuracy = [r.accuracy for r in mine]
        macro_f1 = [r.macro_f1 for r in mine]
        wall = statistics.fmean(r.wall_seconds for r in mine)
        figures[name] = {
            "trainable": mine[0].trainable,
            "trainable_pct": 100.0 * mine[0].trainable / model_size,
            "learning_rate": LEARNING_RATES[name],
            "accuracy_mean": statistics.fmean(accuracy),
            "accuracy_sd": statistics.stdev(accuracy) if len(mine) > 1 else 0.0,
            "accuracy_by_seed": accuracy,
            "macro_f1_mean": statistics.fmean(macro_f1),
            "macro_f1_sd": statistics.stdev(macro_f1) if len(mine) > 1 else 0.0,
            "macro_f1_by_seed": macro_f1,
            "wall_seconds_mean": wall,
            "accuracy_minus_scratch_mean": statistics.fmean(
                r.accuracy - scratch[r.seed].accuracy for r in mine
            ),
            "seeds_better_than_scratch": sum(r.accuracy > scratch[r.seed].accuracy for r in mine),
            "wall_ratio_to_scratch": wall
            / statistics.fmean(r.wall_seconds for r in scratch.values()),
        }
    return figures


def print_table(
    figures: dict[str, dict[str, Any]], pre: dict[str, Any], sizes: dict[str, Any]
) -> None:
    print(
        f"pretrained on digits 0-4 ({sizes['pretrain']['train']} images, {pre['epochs']} "
        f"epochs, {pre['wall_seconds']:.0f} s): validation accuracy {pre['accuracy']:.3f} on "
        f"{sizes['pretrain']['validation']} images ({pre['accuracy_recalibrated']:.3f} with "
        "batch norm statistics over all its training images)"
    )
    print(
        f"transfer to digits 5-9: {sizes['transfer']['train']} training images, "
        f"{sizes['transfer']['validation']} validation images; seeds {sizes['seeds']}"
    )
    header = (
        f"{'method':<10} {'trainable':>9} {'%':>7} {'lr':>6} {'accuracy':>13} "
        f"{'macro-F1':>13} {'wall s':>6}  accuracy by seed"
    )
    print(header)
    print("-" * (len(header) + 12))
    for name, f in figures.items():
        by_seed = " ".join(f"{a:.3f}" for a in f["accuracy_by_seed"])
        print(
            f"{name:<10} {f['trainable']:>9,} {f['trainable_pct']:>6.2f}% "
            f"{f['learning_rate']:>6g} {f['accuracy_mean']:>6.3f} ± {f['accuracy_sd']:.3f} "
            f"{f['macro_f1_mean']:>6.3f} ± {f['macro_f1_sd']:.3f} "
            f"{f['wall_seconds_mean']:>6.1f}  {by_seed}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="transfer seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=30, help="transfer epochs")
    parser.add_argument("--batch-size", type=int, default=20, help="transfer batch size")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument("--pretrain-batch-size", type=int, default=PRETRAIN_BATCH_SIZE)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.seeds = [int(seed) for seed in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="digits-transfer-") as tmp:
        root = Path(tmp)
        data, pretrain_sizes = folders(root / "data" / "pretrain", pretrain_split(seed=0))
        random_dir = random_model_dir(root / "models" / "random", seed=0)
        registry = write_registry(root / "models.json", {RANDOM_MODEL: random_dir})
        pretrained_dir, pre = pretrain(data, root, registry, args)
        registry = write_registry(
            root / "models.json", {RANDOM_MODEL: random_dir, PRETRAINED_MODEL: pretrained_dir}
        )
        runs: list[Run] = []
        for seed in args.seeds:
            seed_runs, model_size, transfer_sizes = transfer(
                seed, root / f"seed-{seed}", registry, args
            )
            runs += seed_runs
    figures = aggregate(runs, model_size)
    sizes = {"pretrain": pretrain_sizes, "transfer": transfer_sizes, "seeds": args.seeds}
    print_table(figures, pre, sizes)
    print(
        json.dumps(
            {
                "bench": "digits_transfer",
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "threads": torch.get_num_threads(),
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "sizes": sizes,
                "pretrain": pre,
                "methods": figures,
                "total_wall_seconds": time.monotonic() - started,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
