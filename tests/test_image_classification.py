"""Image classification on tiny random MobileNetV2 and ViT models, with digits as images.

The images are scikit-learn's 8x8 digits, scaled to 32x32 grayscale PNGs (the task decodes
them as RGB); the data comes as JSONL with relative paths, JSONL with base64 (and data:
URIs), and as an image folder. A short run lowers the eval loss, the output reloads with
`load_trained` and gives the trained model's logits, and bad data is refused with the line
at fault.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peft_engine import DataPaths, load_trained, train
from peft_engine.data.formats import read_examples
from peft_engine.data.images import decode_image
from peft_engine.errors import DataError
from peft_engine.methods import METHODS
from peft_engine.prepare import prepare_job
from tests.conftest import local_model, write_jsonl, write_registry

CLASSES = (0, 1, 2)
N_TRAIN, N_VALIDATION = 10, 5  # per class
# MobileNetV2's 1x1 convolutions: LoRA adapts them (peft's LoRA supports nn.Conv2d).
CONV_TARGETS = ["expand_1x1.convolution", "reduce_1x1.convolution", "conv_1x1.convolution"]


# ---------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------


def _tiny_mobilenet(directory: Path, calibration: list[tuple[bytes, int]]) -> Path:
    """A random MobileNetV2 whose batch norm statistics are set on the calibration images.

    With its initial statistics (mean 0, variance 1) a random body's eval-mode features all
    but vanish, and a frozen body (head only, LoRA) keeps them: measured statistics make it
    pass signal, as a pretrained body does.
    """
    from transformers import MobileNetV2Config, MobileNetV2ImageProcessorPil, MobileNetV2Model

    torch.manual_seed(0)
    model = MobileNetV2Model(MobileNetV2Config(image_size=32, depth_multiplier=0.25))
    processor = MobileNetV2ImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    images = [decode_image(base64.b64encode(png).decode()) for png, _ in calibration]
    with torch.no_grad():
        model.train()(pixel_values=processor(images=images, return_tensors="pt")["pixel_values"])
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _tiny_vit(directory: Path) -> Path:
    """A random ViT; a wider initialisation than ViT's 0.02 gives its CLS state some signal."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        initializer_range=0.1,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, digits) -> dict[str, Path]:
    return {
        "tiny-mobilenet": _tiny_mobilenet(tmp_path_factory.mktemp("mobilenet"), digits["train"]),
        "tiny-vit": _tiny_vit(tmp_path_factory.mktemp("vit")),
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory, model_dirs):
    from peft_engine.models import load_registry

    families = {"tiny-mobilenet": "mobilenet_v2", "tiny-vit": "vit"}
    models = {
        name: local_model(path, families[name], ["image_classification"])
        for name, path in model_dirs.items()
    }
    path = write_registry(tmp_path_factory.mktemp("registry") / "models.json", models)
    return load_registry(path, include_builtins=False)


@pytest.fixture(scope="module")
def digits() -> dict[str, list[tuple[bytes, int]]]:
    """PNG bytes and labels: the first N_TRAIN (train) and next N_VALIDATION of each class."""
    from sklearn.datasets import load_digits

    data = load_digits()
    split: dict[str, list[tuple[bytes, int]]] = {"train": [], "validation": []}
    for label in CLASSES:
        images = [img for img, t in zip(data.images, data.target, strict=True) if t == label]
        pngs = [_png(img) for img in images[: N_TRAIN + N_VALIDATION]]
        split["train"] += [(png, label) for png in pngs[:N_TRAIN]]
        split["validation"] += [(png, label) for png in pngs[N_TRAIN:]]
    return split


def _png(image: Any) -> bytes:
    """An 8x8 digit (0..16) as a 32x32 grayscale PNG."""
    import numpy as np
    from PIL import Image

    pixels = (np.asarray(image) * (255 / 16)).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(buffer, "PNG")
    return buffer.getvalue()


def _with_paths(folder: Path, name: str, rows: list[tuple[bytes, int]]) -> Path:
    """JSONL whose images are PNG files beside it (paths relative to the file's folder)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (png, label) in enumerate(rows):
        (folder / "images" / f"{name}-{i}.png").write_bytes(png)
        lines.append({"image": f"images/{name}-{i}.png", "label": label})
    return write_jsonl(folder / f"{name}.jsonl", lines)


def _with_base64(path: Path, rows: list[tuple[bytes, int]]) -> Path:
    """JSONL with the images inline: base64, every other one as a data: URI, labels str."""
    lines = []
    for i, (png, label) in enumerate(rows):
        encoded = base64.b64encode(png).decode()
        image = f"data:image/png;base64,{encoded}" if i % 2 else encoded
        lines.append({"image": image, "label": f"digit-{label}"})
    return write_jsonl(path, lines)


def _image_folder(folder: Path, rows: list[tuple[bytes, int]]) -> Path:
    for i, (png, label) in enumerate(rows):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"{i:03d}.png").write_bytes(png)
    return folder


def _spec(model: str, method: dict[str, Any], **hyperparameters: Any) -> dict[str, Any]:
    return {
        "model": model,
        "task": "image_classification",
        "method": method,
        "hyperparameters": {
            "n_epochs": 4,
            "batch_size": 6,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.0,
            "eval_every_steps": 5,
            "checkpoint_every_steps": 1000,
            "early_stopping": None,
        }
        | hyperparameters,
    }


@pytest.fixture
def train_run(tmp_path, registry, cache_dir):
    """Train a spec on data in tmp_path/run: the result, and its result.json once it succeeded."""

    def run(spec: dict[str, Any], data: DataPaths):
        result = train(spec, tmp_path / "run", data=data, registry=registry, cache_dir=cache_dir)
        assert result.status == "succeeded"
        return result, json.loads((result.output_dir / "result.json").read_text())

    return run


def _digits_with_paths(folder: Path, digits) -> DataPaths:
    """The digits' training and validation files, each image a file beside them."""
    return DataPaths(
        _with_paths(folder, "train", digits["train"]),
        _with_paths(folder, "validation", digits["validation"]),
    )


def _logits(model: Any, output_dir: Path, png_rows: list[tuple[bytes, int]]) -> torch.Tensor:
    """The model's logits on the images, preprocessed by the processor saved in the output."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(output_dir, local_files_only=True)
    images = [decode_image(base64.b64encode(png).decode()) for png, _ in png_rows]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model.eval()(pixel_values=pixel_values.to(model.device)).logits
    return logits.float().cpu()


def _assert_reloads(result: Any, base_dir: Path, rows: list[tuple[bytes, int]]) -> None:
    """`load_trained` on the output gives the trained model's logits (same device and dtype);
    batch norm's running statistics travel with the weights that were trained."""
    model = result.model
    expected = _logits(model, result.output_dir, rows)
    reloaded = load_trained(result.output_dir, base_dir, dtype=model.dtype, device=model.device)
    got = _logits(reloaded, result.output_dir, rows)
    tolerance = 1e-5 if model.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a busy small machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def lora_for_images():
    """LoRA declares image classification among its tasks."""
    assert "image_classification" in METHODS["lora"].tasks


# ---------------------------------------------------------------------------------------
# Reading image data
# ---------------------------------------------------------------------------------------


def test_an_image_folder_reads_in_sorted_order_with_folder_names_as_labels(tmp_path, digits):
    folder = _image_folder(tmp_path / "data", digits["validation"])
    (folder / ".DS_Store").write_bytes(b"x")  # hidden entries are skipped
    examples = read_examples(folder)
    assert [e.line for e in examples] == list(range(1, len(digits["validation"]) + 1))
    assert [e.record["label"] for e in examples] == [
        str(label) for _, label in digits["validation"]
    ]
    first = examples[0].record["image"]
    assert first.is_absolute() and first == (folder / "0" / "000.png").absolute()
    assert decode_image(first).mode == "RGB"


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({}, "has no images"),
        ({"README.md": b"hi"}, "README.md is not a label folder"),
        ({"a/x.png": None, "b/notes.txt": b"hi"}, "b/notes.txt is not an image file"),
        ({"a/x.png": None, "b/deeper/y.png": None}, "b/deeper is not an image file"),
        ({"a/x.png": None, "b/.hidden": b"hi"}, "label folder b is empty"),
    ],
)
def test_an_image_folder_that_does_not_fit_the_layout_is_refused(
    tmp_path, digits, layout, expected
):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content if content is not None else digits["train"][0][0])
    with pytest.raises(DataError, match=expected) as info:
        read_examples(folder, param="validation_file")
    assert info.value.param == "validation_file"


def test_image_paths_resolve_from_the_data_files_folder_and_never_outside(tmp_path, digits):
    png = digits["train"][0][0]
    (tmp_path / "outside.png").write_bytes(png)
    (tmp_path / "data" / "img").mkdir(parents=True)
    (tmp_path / "data" / "img" / "a.png").write_bytes(png)
    rows = [
        {"image": "img/a.png", "label": 0},
        {"image": "../outside.png", "label": 0},
        {"image": str(tmp_path / "outside.png"), "label": 0},
        {"image": base64.b64encode(png).decode(), "label": 0},
    ]
    examples = read_examples(write_jsonl(tmp_path / "data" / "train.jsonl", rows))
    images = [e.record["image"] for e in examples]
    assert images[0] == (tmp_path / "data" / "img" / "a.png").absolute()
    assert images[1:3] == ["../outside.png", str(tmp_path / "outside.png")]  # not files here
    assert decode_image(images[3]).size == (32, 32)


# ---------------------------------------------------------------------------------------
# Training and reloading
# ---------------------------------------------------------------------------------------


def test_full_fine_tuning_of_vit_from_base64_lowers_eval_loss_and_reloads(
    tmp_path, digits, model_dirs, train_run
):
    data = DataPaths(
        _with_base64(tmp_path / "train.jsonl", digits["train"]),
        _with_base64(tmp_path / "validation.jsonl", digits["validation"]),
    )
    spec = _spec("tiny-vit", {"type": "full"}, n_epochs=8, learning_rate=1e-3)
    result, report = train_run(spec, data)
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]
    assert {"accuracy", "macro_f1"} <= set(report["metrics"]["best"])
    info = json.loads((result.output_dir / "tuneq_model.json").read_text())
    assert info["task"] == "image_classification"
    assert info["labels"] == ["digit-0", "digit-1", "digit-2"]

    _assert_reloads(result, model_dirs["tiny-vit"], digits["validation"])


def test_full_fine_tuning_of_mobilenet_from_relative_paths_lowers_eval_loss_and_reloads(
    tmp_path, digits, model_dirs, train_run
):
    data = _digits_with_paths(tmp_path / "data", digits)
    # MobileNetV2's batch norms keep the last batch's statistics (momentum 0.997 in PyTorch's
    # sense): evaluation is steadier after batches of 15 than of 6
    spec = _spec("tiny-mobilenet", {"type": "full"}, batch_size=15, n_epochs=8)
    result, report = train_run(spec, data)
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]
    assert report["metrics"]["best"]["accuracy"] > 1 / len(CLASSES)

    # batch norm statistics move in training too: the output keeps them beside the weights
    saved = load_file(result.output_dir / "trained_weights.safetensors")
    assert any(name.endswith("running_mean") for name in saved)
    _assert_reloads(result, model_dirs["tiny-mobilenet"], digits["validation"])


def test_lora_on_mobilenet_convolutions_from_an_image_folder_freezes_the_body_and_reloads(
    tmp_path, digits, model_dirs, train_run, lora_for_images
):
    from transformers import AutoModel

    data = DataPaths(
        _image_folder(tmp_path / "train", digits["train"]),
        _image_folder(tmp_path / "validation", digits["validation"]),
    )
    method = {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": CONV_TARGETS}
    result, report = train_run(_spec("tiny-mobilenet", method, learning_rate=1e-2), data)
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]

    # the body is frozen, batch norm statistics included: only the adapter and head changed
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    original = AutoModel.from_pretrained(model_dirs["tiny-mobilenet"], dtype=model.dtype)
    body = model.get_base_model().body.state_dict()
    for name, tensor in original.state_dict().items():
        key = name.replace(".convolution.", ".convolution.base_layer.")
        assert torch.equal(body.get(key, body.get(name)).cpu(), tensor), name

    _assert_reloads(result, model_dirs["tiny-mobilenet"], digits["validation"])


def test_head_only_on_vit_trains_the_head_alone_and_reloads(
    tmp_path, digits, model_dirs, train_run
):
    data = _digits_with_paths(tmp_path / "data", digits)
    spec = _spec("tiny-vit", {"type": "head_only"}, n_epochs=8, learning_rate=3e-2)
    result, report = train_run(spec, data)
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}

    _assert_reloads(result, model_dirs["tiny-vit"], digits["validation"])


# ---------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------


def _prepare(spec: dict[str, Any], data: DataPaths, registry, cache_dir):
    from peft_engine.spec import parse_spec

    return prepare_job(parse_spec(spec), data, registry=registry, cache_dir=cache_dir)


def test_an_image_that_cannot_be_decoded_is_a_data_error_naming_its_line(
    tmp_path, digits, registry, cache_dir
):
    good = base64.b64encode(digits["train"][0][0]).decode()
    rows = [
        {"image": good, "label": 0},
        {"image": good, "label": 1},
        {"image": "images/missing.png", "label": 0},
        {"image": base64.b64encode(b"not a picture").decode(), "label": 1},
        {"image": "data:image/png;base64,%%%", "label": 1},
    ]
    data = DataPaths(
        write_jsonl(tmp_path / "train.jsonl", rows),
        _with_paths(tmp_path, "validation", digits["validation"][:2]),
    )
    with pytest.raises(DataError) as info:
        _prepare(_spec("tiny-mobilenet", {"type": "full"}), data, registry, cache_dir)
    err = info.value
    assert err.param == "training_file" and err.total_errors == 3
    assert [(e.line, e.field) for e in err.errors] == [(3, "image"), (4, "image"), (5, "image")]
    assert "'images/missing.png' is not a file in the data file's folder" in err.errors[0].message
    assert "not base64" not in err.errors[1].message and "Pillow" in err.errors[1].message
    assert "not valid base64" in err.errors[2].message
    assert "line 3, image" in str(err)


def test_a_validation_label_the_training_data_lacks_is_a_data_error(
    tmp_path, digits, registry, cache_dir
):
    validation = [*digits["validation"][:2], (digits["validation"][0][0], 7)]
    data = DataPaths(
        _with_paths(tmp_path, "train", digits["train"]),
        _with_paths(tmp_path, "validation", validation),
    )
    with pytest.raises(DataError, match="labels the training file does not have") as info:
        _prepare(_spec("tiny-mobilenet", {"type": "full"}), data, registry, cache_dir)
    assert info.value.param == "validation_file"
    assert [(e.line, e.field) for e in info.value.errors] == [(3, "label")]


def test_a_micro_batch_of_one_image_trains_through_batch_norm(
    tmp_path, digits, model_dirs, train_run
):
    """An epoch whose last micro-batch holds one image: MobileNetV2's last batch norms see
    1x1 feature maps, one value a channel, which training mode cannot normalise. That pass
    uses the running statistics instead (and leaves them as they were)."""
    data = _digits_with_paths(tmp_path / "data", digits)
    n_train = len(digits["train"])
    spec = _spec("tiny-mobilenet", {"type": "full"}, batch_size=n_train - 1, n_epochs=1)
    result, report = train_run(spec, data)  # step 2 is the one image
    assert report["steps"] == 2
    assert all(m.training for m in result.model.modules())  # back in training mode


def test_running_batch_norm_leaves_the_statistics_and_the_mode_as_they_were():
    from peft_engine.tasks.image import running_batch_norm

    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    norm = body[1]
    before = (norm.running_mean.clone(), norm.running_var.clone(), int(norm.num_batches_tracked))
    with running_batch_norm(body):
        assert not norm.training
        body(torch.randn(1, 3, 1, 1)).sum().backward()  # one value a channel: fine here
    assert norm.training
    after = (norm.running_mean, norm.running_var, int(norm.num_batches_tracked))
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert after[2] == before[2]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        body(torch.randn(1, 3, 1, 1))  # what the training step would have met
