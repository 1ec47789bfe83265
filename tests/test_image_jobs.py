"""An image job's plan and outcome as the service shows them: the dry run counts images (not
tokens) and divides them by images per second, and `GET /jobs/{id}/metrics` carries the
finished job's kept metrics and its classification report (the confusion matrix)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from peft_engine.estimate import Throughput, estimate_job
from peft_engine.models import load_registry
from peft_engine.prepare import DataPaths
from peft_engine.spec import parse_spec
from tests.conftest import local_model, write_registry
from tuneq.jobs.service import _outcome
from tuneq.settings import Settings
from tuneq.throughput.service import default_throughput

FIGURES = Throughput(
    train_tokens_per_second=40.0,  # images here
    eval_tokens_per_second=120.0,
    load_seconds=3.0,
    seconds_per_checkpoint=0.5,
    basis="measured: a test's figures",
)


def _png(shade: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (16, 16), shade).save(buffer, "PNG")
    return buffer.getvalue()


def _folder(root: Path, per_label: int) -> Path:
    for label in ("cat", "dog", "owl"):
        (root / label).mkdir(parents=True)
        for i in range(per_label):
            (root / label / f"{i}.png").write_bytes(_png(40 * i))
    return root


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from transformers import MobileNetV2Config, MobileNetV2ImageProcessorPil, MobileNetV2Model

    directory = tmp_path_factory.mktemp("mobilenet")
    MobileNetV2Model(MobileNetV2Config(image_size=32, depth_multiplier=0.25)).save_pretrained(
        directory
    )
    MobileNetV2ImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(directory)
    models = {"tiny-mobilenet": local_model(directory, "mobilenet_v2", ["image_classification"])}
    path = write_registry(tmp_path_factory.mktemp("registry") / "models.json", models)
    return load_registry(path, include_builtins=False)


def test_an_image_jobs_estimate_counts_images(tmp_path, registry):
    data = DataPaths(_folder(tmp_path / "train", 4), _folder(tmp_path / "validation", 2))
    spec = parse_spec(
        {
            "model": "tiny-mobilenet",
            "task": "image_classification",
            "method": {"type": "head_only"},
            "hyperparameters": {"n_epochs": 2, "batch_size": 4, "eval_every_steps": 3},
        }
    )
    estimate = estimate_job(
        spec, data, registry=registry, cache_dir=tmp_path / "cache", throughput=FIGURES
    )
    shown = estimate.as_dict()
    assert shown["unit"] == "images"
    assert (shown["n_train_examples"], shown["n_validation_examples"]) == (12, 6)
    assert (shown["train_images_per_epoch"], shown["trained_images"]) == (12, 24)
    assert shown["total_steps"] == 6
    # every evaluation reads the six validation images: the base model's, steps 3 and 6
    assert (shown["evaluations"], shown["eval_images"]) == (3, 18)
    assert not {"trained_tokens", "eval_tokens", "tokens_exact", "truncated_examples"} & set(shown)
    assert shown["seconds_by_phase"]["train"] == pytest.approx(24 / 40.0, abs=0.05)
    assert shown["seconds_by_phase"]["eval"] == pytest.approx(18 / 120.0, abs=0.05)


def test_an_image_model_not_yet_trained_here_is_estimated_in_images_per_second():
    settings = Settings(estimated_images_per_second=7.0, estimated_tokens_per_second=900.0)
    images = default_throughput(settings, model="m", task="image_classification")
    text = default_throughput(settings, model="m", task="seq_classification")
    assert (images.train_tokens_per_second, text.train_tokens_per_second) == (7.0, 900.0)


def test_a_finished_jobs_metrics_carry_its_kept_metrics_and_report():
    report = {"labels": ["a", "b"], "per_class": {}, "confusion_matrix": [[3, 1], [0, 4]]}
    result = {
        "metrics": {"initial": {"accuracy": 0.5}, "best": {"accuracy": 0.8}, "kept": {}},
        "best_step": 6,
        "report": report,
    }
    assert _outcome(result) == {"kept": {"accuracy": 0.8}, "best_step": 6, "report": report}
    whole = {**result, "metrics": {"best": {"accuracy": 0.8}, "kept": {"accuracy": 0.875}}}
    assert _outcome(whole)["kept"] == {"accuracy": 0.875}
    assert "report" not in _outcome({**result, "report": None})  # causal LM has none
    assert _outcome(None) == {}


def test_all_linear_on_a_convolutional_body_adapts_its_pointwise_convolutions(registry):
    from torch import nn

    from peft_engine.methods.common import peft_targets
    from peft_engine.models import model_dir
    from peft_engine.tasks.image import IMAGE_CLASSIFICATION

    base = model_dir(registry.get("tiny-mobilenet"), Path("unused"))
    model = IMAGE_CLASSIFICATION.build_model(base, {"labels": ["a", "b"]})
    names = peft_targets(model, "all-linear", "image_classification")
    modules = dict(model.named_modules())
    assert names and all(modules[n].kernel_size == (1, 1) for n in names)
    assert all(modules[n].groups == 1 for n in names)
    assert not any(n.startswith("classifier") for n in names)  # the head trains whole
    depthwise = [m for m in modules.values() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and not {id(m) for m in depthwise} & {id(modules[n]) for n in names}
