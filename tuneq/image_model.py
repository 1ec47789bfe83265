"""An image base model an operator can build offline: a small MobileNetV2 pretrained on digits.

`tuneq admin build-image-model` calls `build_digits_model`, and bench/digits_transfer.py
uses the same pieces. A MobileNetV2 (from config, depth multiplier 0.5, 32x32 input, random
init) is trained with the engine itself (method `full`, task image_classification) on the
digits 0-4 of the UCI "Optical Recognition of Handwritten Digits" data (E. Alpaydin,
C. Kaynak, 1998; CC BY 4.0), shipped as tuneq/demo/data/digits.csv.gz (scikit-learn's copy:
1797 rows of 64 pixel values 0..16, then the digit). Its trained body and image processor
are saved as a Hugging Face directory; a user then trains a new head for their own classes
on it (head_only, lora, full). Two sample archives of digits 5-9 are written with it.

Torch and transformers are imported inside the functions: the control plane imports this
module's package without them.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
TRANSFER_DIGITS = (5, 6, 7, 8, 9)
IMAGE_SIZE = 32
DEPTH_MULTIPLIER = 0.5
PRETRAIN_LEARNING_RATE = 2e-3
PRETRAIN_EPOCHS = 15
# 721 pretraining images: 32 leaves a last batch of 17 (a batch norm trains poorly on a
# batch of one image whose feature map is 1x1, as MobileNetV2's is at 32x32).
PRETRAIN_BATCH_SIZE = 32
SAMPLE_TRAIN_PER_CLASS = 20
DATA_CITATION = (
    'UCI "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998), '
    "CC BY 4.0, as shipped with scikit-learn (8x8, values 0..16)"
)
LICENSE = "CC-BY-4.0"
RANDOM_MODEL = "digits-random"

# (index in the data file, digit, its 64 pixel values 0..16 row by row)
Digit = tuple[int, int, tuple[int, ...]]


# --- the data ----------------------------------------------------------------------------


def load_digits() -> list[Digit]:
    """Every row of the shipped data file, in file order (scikit-learn's `load_digits`)."""
    resource = files("tuneq.demo").joinpath("data", "digits.csv.gz")
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="ascii") as text:
        rows = [[int(value) for value in row] for row in csv.reader(text)]
    return [(index, row[64], tuple(row[:64])) for index, row in enumerate(rows)]


def digits_by_class(seed: int) -> dict[int, list[Digit]]:
    """The digits per class, each class shuffled by seed."""
    by_digit: dict[int, list[Digit]] = {d: [] for d in range(10)}
    for item in load_digits():
        by_digit[item[1]].append(item)
    rng = random.Random(seed)
    for items in by_digit.values():
        rng.shuffle(items)
    return by_digit


def split_digits(
    by_digit: dict[int, list[Digit]], cuts: dict[int, int]
) -> tuple[list[Digit], list[Digit]]:
    """For the digits in `cuts`: each one's first `cuts[digit]` images, and the rest."""
    first: list[Digit] = []
    rest: list[Digit] = []
    for digit, cut in cuts.items():
        first += by_digit[digit][:cut]
        rest += by_digit[digit][cut:]
    return first, rest


def pretrain_split(seed: int) -> tuple[list[Digit], list[Digit]]:
    """Digits 0-4: 80% of each digit to train on, 20% held out."""
    by_digit = digits_by_class(seed)
    return split_digits(by_digit, {d: round(0.8 * len(by_digit[d])) for d in PRETRAIN_DIGITS})


def transfer_split(seed: int, train_per_class: int) -> tuple[list[Digit], list[Digit]]:
    """Digits 5-9: `train_per_class` of each digit (by seed) to train on, the rest held out."""
    return split_digits(digits_by_class(seed), dict.fromkeys(TRANSFER_DIGITS, train_per_class))


def digit_png(pixels: Sequence[int]) -> bytes:
    """An 8x8 digit (values 0..16) as a 32x32 grayscale PNG."""
    import numpy as np
    from PIL import Image

    image = (np.asarray(pixels).reshape(8, 8) * (255 / 16)).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(image, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def _member(item: Digit) -> str:
    index, digit, _ = item
    return f"{digit}/{index:04d}.png"


def write_image_folder(folder: Path, items: Sequence[Digit]) -> Path:
    """An image folder `<folder>/<digit>/<index>.png`."""
    for item in items:
        path = folder / _member(item)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(digit_png(item[2]))
    return folder


def write_image_zip(path: Path, items: Sequence[Digit]) -> Path:
    """The same layout as a zip archive (what a user uploads), byte-for-byte reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for item in sorted(items, key=_member):
            info = zipfile.ZipInfo(_member(item), date_time=(1998, 7, 1, 0, 0, 0))
            archive.writestr(info, digit_png(item[2]), zipfile.ZIP_DEFLATED)
    return path


def image_folders(root: Path, train: Sequence[Digit], validation: Sequence[Digit]) -> Any:
    """A job's data (`peft_engine.DataPaths`): image folders `root/train`, `root/validation`."""
    from peft_engine import DataPaths

    return DataPaths(
        write_image_folder(root / "train", train),
        write_image_folder(root / "validation", validation),
    )


# --- the model ---------------------------------------------------------------------------


def image_processor() -> Any:
    from transformers import MobileNetV2ImageProcessorPil

    return MobileNetV2ImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def random_model_dir(directory: Path, seed: int) -> Path:
    """A randomly initialised MobileNetV2 body and its image processor."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

    torch.manual_seed(seed)
    config = MobileNetV2Config(image_size=IMAGE_SIZE, depth_multiplier=DEPTH_MULTIPLIER)
    MobileNetV2Model(config).save_pretrained(directory)
    image_processor().save_pretrained(directory)
    return directory


def write_registry(path: Path, models: dict[str, Path]) -> Any:
    """A registry (JSON file at `path`) of these MobileNetV2 directories alone."""
    from peft_engine.models import load_registry

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


def job_spec(
    model: str, method: dict[str, Any], lr: float, *, epochs: int, batch_size: int, seed: int
) -> dict[str, Any]:
    """An image_classification job evaluated once, at its end (no step is chosen on the
    validation data)."""
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
            "eval_every_steps": 10_000_000,
            "checkpoint_every_steps": 10_000_000,
        },
    }


def run_job(spec: dict[str, Any], data: Any, workdir: Path, registry: Any, cache: Path) -> Any:
    """`peft_engine.train`, which must succeed."""
    from peft_engine import train

    result = train(spec, workdir, data=data, registry=registry, cache_dir=cache)
    if result.status != "succeeded":
        raise RuntimeError(f"{spec['method']['type']} run did not finish: {result.status}")
    return result


def pretrain(
    data: Any, root: Path, registry: Any, *, epochs: int, batch_size: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Train the registry's random model on `data`; the trained model and its figures.

    transformers' MobileNetV2 gives its batch norms momentum 0.997 in PyTorch's sense (new
    statistics weigh 0.997: TensorFlow's decay read the other way round), so after training
    the running statistics are the last batch's. They are measured again over all the
    training images, as a pretrained checkpoint's are, before the model is evaluated and
    saved. The model is taken from memory: the trained-weights output keeps parameters
    only, not running statistics.
    """
    import torch

    from peft_engine.prepare import prepare_job
    from peft_engine.spec import parse_spec
    from peft_engine.tasks.image import IMAGE_CLASSIFICATION

    spec = job_spec(
        RANDOM_MODEL,
        {"type": "full"},
        PRETRAIN_LEARNING_RATE,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    result = run_job(spec, data, root / "runs" / "pretrain", registry, root / "cache")
    job = prepare_job(parse_spec(spec), data, registry=registry, cache_dir=root / "cache")
    recalibrate_batch_norm(result.model, job.train.examples)
    recalibrated, _, _ = IMAGE_CLASSIFICATION.evaluate(
        result.model, batches(job.validation.examples), torch.device("cpu"), job
    )
    final = result.result["metrics"]["final"]
    return result.model, {
        "accuracy": final["accuracy"],
        "accuracy_recalibrated": recalibrated["accuracy"],
        "macro_f1_recalibrated": recalibrated["macro_f1"],
        "epochs": epochs,
        "batch_size": batch_size,
        "steps": result.result["steps"],
        "wall_seconds": result.result["wall_seconds"],
    }


def save_body(model: Any, directory: Path) -> Path:
    """The trained model's body (no head: a user's job adds one) and its image processor."""
    model.body.save_pretrained(directory)
    image_processor().save_pretrained(directory)
    return directory


def batches(examples: list[Any], size: int = 64) -> Iterator[Any]:
    from peft_engine.tasks.image import collate_images

    for start in range(0, len(examples), size):
        yield collate_images(examples[start : start + size])


def recalibrate_batch_norm(model: Any, examples: list[Any]) -> None:
    """Set every batch norm's running statistics to their mean over the examples."""
    import torch

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


def registry_fields(model_dir: Path) -> dict[str, Any]:
    """The operator registry's entry for a built model directory."""
    return {
        "source": {"type": "local", "path": str(Path(model_dir).resolve())},
        "description": "MobileNetV2 (depth 0.5, 32x32 input) pretrained on handwritten digits "
        "0-4 (UCI digits), without its head: a body to train new image classes on",
        "license": LICENSE,
        "family": "mobilenet_v2",
        "tasks": ["image_classification"],
    }


# --- the build ---------------------------------------------------------------------------


def build_digits_model(
    out_dir: Path,
    *,
    epochs: int = PRETRAIN_EPOCHS,
    seed: int = 0,
    threads: int = 1,
    train_per_class: int = SAMPLE_TRAIN_PER_CLASS,
) -> dict[str, Any]:
    """Pretrain the digits model and write it to `out_dir`, replacing what is there.

    `out_dir` gets config.json, model.safetensors, preprocessor_config.json, a README.md
    model card, and samples/digits-5-9-{train,validation}.zip (ImageFolder archives split by
    `seed`, `train_per_class` images of each digit to train on) for users to try transfer
    with. It is built in a temporary directory beside `out_dir`, then renamed into place.
    One thread by default: two OpenMP threads on a small shared machine were 10-50x slower.
    """
    import torch

    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with tempfile.TemporaryDirectory(prefix="digits-pretrain-") as tmp:
            root = Path(tmp)
            train_items, held_out = pretrain_split(seed)
            data = image_folders(root / "data", train_items, held_out)
            random_dir = random_model_dir(root / "models" / "random", seed)
            registry = write_registry(root / "models.json", {RANDOM_MODEL: random_dir})
            model, figures = pretrain(
                data, root, registry, epochs=epochs, batch_size=PRETRAIN_BATCH_SIZE, seed=seed
            )
            save_body(model, staging)
        samples = _write_samples(staging / "samples", seed, train_per_class)
        figures |= {
            "parameters": sum(p.numel() for p in model.body.parameters()),
            "train_images": len(train_items),
            "held_out_images": len(held_out),
            "seed": seed,
        }
        (staging / "README.md").write_text(model_card(figures, samples), encoding="utf-8")
        _make_readable(staging)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return figures | {
        "model_dir": str(out_dir),
        "samples": {name: str(out_dir / "samples" / name) for name in samples},
        "build_seconds": time.monotonic() - started,
    }


def _write_samples(folder: Path, seed: int, train_per_class: int) -> dict[str, int]:
    """The digits 5-9 archives; how many images each holds."""
    folder.mkdir()
    train, validation = transfer_split(seed, train_per_class)
    write_image_zip(folder / "digits-5-9-train.zip", train)
    write_image_zip(folder / "digits-5-9-validation.zip", validation)
    return {"digits-5-9-train.zip": len(train), "digits-5-9-validation.zip": len(validation)}


def _make_readable(folder: Path) -> None:
    """mkdtemp's 0700 would hide the model from an API or worker running as another user."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` is moved aside first and then deleted."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        target.rename(old / target.name)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_card(figures: dict[str, Any], samples: dict[str, int]) -> str:
    """The model directory's README.md: what it is, its data and licence, how good it is."""
    listed = "\n".join(f"- `samples/{name}`: {n} images" for name, n in samples.items())
    return f"""# MobileNetV2 (depth 0.5, 32x32) pretrained on handwritten digits 0-4

A small image backbone for trying transfer learning with tuneq (task
`image_classification`): the body of a MobileNetV2 ({figures["parameters"]:,} parameters)
without its classification head, with its image processor. A job trains a new head for
its own classes, with the body frozen (`head_only`), adapted (`lora`) or trained (`full`).

Built by `tuneq admin build-image-model`: random initialisation (seed {figures["seed"]}),
then {figures["epochs"]} epochs of method `full` on {figures["train_images"]} images of
digits 0-4 (80% of each digit); batch norm statistics measured again over those images.

## Data

{DATA_CITATION}; scaled to 32x32 grayscale. Licence of the data and of these weights,
which are derived from it: Creative Commons Attribution 4.0 (CC BY 4.0).

## Accuracy

On the {figures["held_out_images"]} held-out images of digits 0-4: accuracy
{figures["accuracy_recalibrated"]:.3f}, macro-F1 {figures["macro_f1_recalibrated"]:.3f}.

## Samples for transfer (digits 5-9, which it never saw)

{listed}

ImageFolder zip archives (`<digit>/<index>.png`): upload them as a job's training and
validation files. On these, bench/digits_transfer.py measured about 0.5 accuracy with the
body frozen (`head_only`: features of 0-4 separate 5-9 only partly) and about 0.92 with
`lora` or `full`.
"""
