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

The digits are 8x8 (values 0..16), scaled to 32x32 grayscale PNGs; the image processor
resizes to 32 and normalises. One table, then one JSON line with the figures: per method
trainable parameters (count and % of the model), validation accuracy and macro-F1 (mean,
sd, per seed), wall seconds and the ratio to scratch's.

Torch runs on one thread by default (`--threads`): on a small shared machine two OpenMP
threads fighting other processes for two cores made steps 10-50x slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peft_engine import DataPaths, train  # noqa: E402
from peft_engine.models import load_registry  # noqa: E402
from peft_engine.prepare import prepare_job  # noqa: E402
from peft_engine.spec import parse_spec  # noqa: E402
from peft_engine.tasks.image import IMAGE_CLASSIFICATION, collate_images  # noqa: E402

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TRANSFER_DIGITS = (5, 6, 7, 8, 9)
IMAGE_SIZE = 32
DEPTH_MULTIPLIER = 0.5
# MobileNetV2's 1x1 convolutions (peft's LoRA adapts nn.Conv2d; the 3x3 ones are depthwise).
CONV_TARGETS = ["expand_1x1.convolution", "reduce_1x1.convolution", "conv_1x1.convolution"]
LEARNING_RATES = {"pretrain": 2e-3, "head_only": 1e-2, "lora": 5e-3, "full": 2e-3, "scratch": 2e-3}
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "head_only": {"type": "head_only"},
    "lora": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": CONV_TARGETS},
    "full": {"type": "full"},
    "scratch": {"type": "full"},
}


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
# Data and models
# ---------------------------------------------------------------------------------------


def digit_png(image: Any) -> bytes:
    """An 8x8 digit (values 0..16) as a 32x32 grayscale PNG."""
    import numpy as np
    from PIL import Image

    pixels = (np.asarray(image) * (255 / 16)).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def write_folder(folder: Path, items: list[tuple[int, Any]]) -> Path:
    """An image folder `<folder>/<digit>/<index>.png` of (index, image) items per digit."""
    for index, (digit, image) in items:
        (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        (folder / str(digit) / f"{index:04d}.png").write_bytes(digit_png(image))
    return folder


def digits_by_class(seed: int) -> dict[int, list[tuple[int, tuple[int, Any]]]]:
    """scikit-learn's digits per class as (index, (digit, image)), shuffled by seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    by_digit: dict[int, list[tuple[int, tuple[int, Any]]]] = {d: [] for d in range(10)}
    for index, (image, digit) in enumerate(zip(data.images, data.target, strict=True)):
        by_digit[int(digit)].append((index, (int(digit), image)))
    rng = random.Random(seed)
    for items in by_digit.values():
        rng.shuffle(items)
    return by_digit


def pretrain_data(root: Path, seed: int) -> tuple[DataPaths, dict[str, int]]:
    """Digits 0-4 as image folders: 80% of each digit to train on, 20% to validate."""
    by_digit = digits_by_class(seed)
    cuts = {digit: round(0.8 * len(by_digit[digit])) for digit in PRETRAIN_DIGITS}
    return split_into_folders(root, by_digit, cuts)


def transfer_data(root: Path, train_per_class: int, seed: int) -> tuple[DataPaths, dict[str, int]]:
    """Digits 5-9: `train_per_class` of each digit (by seed) to train on, the rest to validate."""
    cuts = dict.fromkeys(TRANSFER_DIGITS, train_per_class)
    return split_into_folders(root, digits_by_class(seed), cuts)


def split_into_folders(
    root: Path, by_digit: dict[int, list[tuple[int, tuple[int, Any]]]], cuts: dict[int, int]
) -> tuple[DataPaths, dict[str, int]]:
    """Image folders of the digits in `cuts`: each digit's first `cuts[digit]` images to train
    on, the rest to validate; the data files, and how many images each holds."""
    train_items, validation_items = [], []
    for digit, cut in cuts.items():
        train_items += by_digit[digit][:cut]
        validation_items += by_digit[digit][cut:]
    data = DataPaths(
        write_folder(root / "train", train_items),
        write_folder(root / "validation", validation_items),
    )
    return data, {"train": len(train_items), "validation": len(validation_items)}


def image_processor() -> Any:
    from transformers import MobileNetV2ImageProcessorPil

    return MobileNetV2ImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def random_model_dir(directory: Path, seed: int) -> Path:
    """A randomly initialised MobileNetV2 body and its image processor."""
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(seed)
    config = MobileNetV2Config(image_size=IMAGE_SIZE, depth_multiplier=DEPTH_MULTIPLIER)
    MobileNetV2Model(config).save_pretrained(directory)
    image_processor().save_pretrained(directory)
    return directory


def write_registry(path: Path, models: dict[str, Path]) -> Any:
    entries = {
        name: {
            "source": {"type": "local", "path": str(directory)},
            "family": "mobilenet_v2",
            "tasks": ["image_classification"],
        }
        for name, directory in models.items()
    }
    path.write_text(json.dumps({"models": entries}))
    return load_registry(path, include_builtins=False)


# ---------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------


def job_spec(
    model: str, method: dict[str, Any], lr: float, *, epochs: int, batch_size: int, seed: int
) -> dict[str, Any]:
    return {
        "model": model,
        "task": "image_classification",
        "method": method,
        "hyperparameters": {
            "n_epochs": epochs,
            "batch_size": batch_size,
            "learning_rate": lr,
            "lr_scheduler": "cosine",
            "seed": seed,
            "early_stopping": None,
            # evaluate only at the end: no step is chosen on the validation data
            "eval_every_steps": 10_000_000,
            "checkpoint_every_steps": 10_000_000,
        },
    }


def run(spec: dict[str, Any], data: DataPaths, workdir: Path, registry: Any, cache: Path) -> Any:
    result = train(spec, workdir, data=data, registry=registry, cache_dir=cache)
    if result.status != "succeeded":
        raise RuntimeError(f"{spec['method']['type']} run did not finish: {result.status}")
    return result


def pretrain(
    data: DataPaths, root: Path, registry: Any, args: argparse.Namespace
) -> tuple[Path, dict[str, Any]]:
    """Train the random model on digits 0-4; save its trained body as a model directory.

    transformers' MobileNetV2 gives its batch norms momentum 0.997 in PyTorch's sense (new
    statistics weigh 0.997: TensorFlow's decay read the other way round), so after training
    the running statistics are the last batch's. Before the body is saved they are measured
    again over all the pretraining images, as a pretrained checkpoint's are. The body is
    taken from the trained model in memory: the trained-weights output keeps parameters
    only, not running statistics.
    """
    spec = job_spec(
        "digits-random",
        {"type": "full"},
        LEARNING_RATES["pretrain"],
        epochs=args.pretrain_epochs,
        batch_size=args.pretrain_batch_size,
        seed=0,
    )
    result = run(spec, data, root / "runs" / "pretrain", registry, root / "cache")
    job = prepare_job(parse_spec(spec), data, registry=registry, cache_dir=root / "cache")
    recalibrate_batch_norm(result.model, job.train.examples)
    recalibrated, _, _ = IMAGE_CLASSIFICATION.evaluate(
        result.model, batches(job.validation.examples), torch.device("cpu"), job
    )
    directory = root / "models" / "pretrained"
    result.model.body.save_pretrained(directory)
    image_processor().save_pretrained(directory)
    final = result.result["metrics"]["final"]
    return directory, {
        "accuracy": final["accuracy"],
        "accuracy_recalibrated": recalibrated["accuracy"],
        "macro_f1_recalibrated": recalibrated["macro_f1"],
        "epochs": args.pretrain_epochs,
        "batch_size": args.pretrain_batch_size,
        "steps": result.result["steps"],
        "wall_seconds": result.result["wall_seconds"],
    }


def batches(examples: list[Any], size: int = 64) -> Iterator[Any]:
    for start in range(0, len(examples), size):
        yield collate_images(examples[start : start + size])


def recalibrate_batch_norm(model: torch.nn.Module, examples: list[Any]) -> None:
    """Set every batch norm's running statistics to their mean over the examples."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for batch in batches(examples):
            model(pixel_values=batch.pixel_values)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def transfer(
    seed: int, root: Path, registry: Any, args: argparse.Namespace
) -> tuple[list[Run], int, dict[str, int]]:
    """One seed's four runs; the model's parameter count; the data's sizes."""
    data, sizes = transfer_data(root / "data", args.train_per_class, seed)
    runs, model_size = [], 0
    for name, method in METHOD_SPECS.items():
        model = "digits-random" if name == "scratch" else "digits-pretrained"
        spec = job_spec(
            model,
            method,
            LEARNING_RATES[name],
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=seed,
        )
        result = run(spec, data, root / "runs" / name, registry, root / "cache")
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
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    # 721 pretraining images: 32 leaves a last batch of 17 (batch norm cannot train on one
    # image whose feature map is 1x1, as MobileNetV2's is at 32x32)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
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
        data, pretrain_sizes = pretrain_data(root / "data" / "pretrain", seed=0)
        random_dir = random_model_dir(root / "models" / "random", seed=0)
        registry = write_registry(root / "models.json", {"digits-random": random_dir})
        pretrained_dir, pre = pretrain(data, root, registry, args)
        registry = write_registry(
            root / "models.json", {"digits-random": random_dir, "digits-pretrained": pretrained_dir}
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
