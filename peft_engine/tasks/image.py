"""Image classification: one label per image, on a vision backbone (ViT, MobileNetV2).

The data is JSONL `{"image", "label"}` (the image a path relative to the data file's folder,
or base64 bytes, optionally a `data:` URI) or an image folder `<dir>/<label>/<image>`
(`peft_engine.data.images`). Every image is decoded with Pillow as RGB and preprocessed once
by the model's own image processor (`AutoImageProcessor`, local files only); the pixel
tensors stay in memory for the whole run. An image that cannot be decoded is a DataError on
its line, field `image`.

Labels, class weights and metrics are the text classifier's: the label set is the training
data's (integers sort as numbers, strings as strings), stored in the output with
`id2label`; evaluation reports accuracy and macro-F1, with per-class scores and the
confusion matrix in the report. An image counts as one "token" in the loop's accounting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peft_engine.data.formats import MAX_REPORTED_ERRORS, Example
from peft_engine.data.images import ImageProblem, decode_image
from peft_engine.errors import DataError, LineError, UserError
from peft_engine.models.loading import from_model_dir
from peft_engine.tasks.base import Dataset, TaskData
from peft_engine.tasks.classification import OneLabelTask
from peft_engine.tasks.labels import class_weight_options, label_ids

if TYPE_CHECKING:
    from peft_engine.models.resident import ResidentLoader

# Images decoded and preprocessed at a time (bounds the decoded images held in memory).
_PROCESS_CHUNK = 256
# Model types whose AutoModel adds a pooler with weights of its own that the head never reads.
_NO_POOLER_TYPES = frozenset({"vit"})


@dataclass(frozen=True)
class ImageExample:
    """One preprocessed image and its class id."""

    line: int
    pixel_values: torch.Tensor  # (channels, height, width), as the image processor made it
    label: int

    @property
    def n_tokens(self) -> int:
        return 1

    @property
    def n_loss_tokens(self) -> int:
        return 1


@dataclass
class ImageBatch:
    pixel_values: torch.Tensor  # (rows, channels, height, width)
    labels: torch.Tensor  # (rows,)
    n_tokens: int
    n_loss_tokens: int
    examples: Sequence[ImageExample]

    def to(self, device: torch.device | str) -> ImageBatch:
        return ImageBatch(
            self.pixel_values.to(device),
            self.labels.to(device),
            self.n_tokens,
            self.n_loss_tokens,
            self.examples,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values}


def collate_images(examples: Sequence[ImageExample]) -> ImageBatch:
    """Stack the images (the processor made them one size) and their labels."""
    return ImageBatch(
        pixel_values=torch.stack([e.pixel_values for e in examples]),
        labels=torch.tensor([e.label for e in examples], dtype=torch.long),
        n_tokens=len(examples),
        n_loss_tokens=len(examples),
        examples=examples,
    )


class ImageClassificationTask(OneLabelTask):
    name = "image_classification"
    unit = "images"

    def prepare(
        self,
        spec: Any,
        train: Sequence[Example],
        validation: Sequence[Example],
        model_path: Path,
        *,
        max_seq_length: int,
        validation_param: str,
    ) -> TaskData:
        labels, ids = label_ids(train, validation, validation_param)
        options = class_weight_options(spec.hyperparameters.class_weights, labels, train)
        processor = load_image_processor(model_path)
        validation_set = (
            _preprocess(validation, processor, ids, validation_param) if validation else None
        )
        return TaskData(
            processor,
            _preprocess(train, processor, ids, "training_file"),
            validation_set,
            labels=labels,
            options=options,
        )

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any:
        from peft_engine.models.heads import ImageClassifier

        return ImageClassifier(load_image_body(base_dir, **kwargs), len(info["labels"]))

    def collate(self, examples: Sequence[ImageExample], job: Any) -> ImageBatch:
        return collate_images(examples)

    def loss(self, model: Any, batch: Any, job: Any) -> Any:
        """A micro-batch of one image (an epoch's last, or a rank's share) has no batch to
        take statistics from: where the body's feature maps are down to 1x1 (MobileNetV2's
        last layers on small images) batch norm in training mode fails on it. Its batch
        norm layers use their running statistics for that one forward pass, and leave them
        as they were."""
        if model.training and len(batch.examples) == 1:
            with running_batch_norm(model):
                return super().loss(model, batch, job)
        return super().loss(model, batch, job)


@contextmanager
def running_batch_norm(model: torch.nn.Module) -> Iterator[None]:
    """The model's batch norm layers in eval mode (running statistics, not updated) inside."""
    switched = [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training
    ]
    for module in switched:
        module.eval()
    try:
        yield
    finally:
        for module in switched:
            module.train()


# ---------------------------------------------------------------------------------------
# The model's files
# ---------------------------------------------------------------------------------------


def load_image_processor(path: Path) -> Any:
    """The model's image processor, from its directory only (`preprocessor_config.json`)."""
    from transformers import AutoImageProcessor

    if not (path / "preprocessor_config.json").is_file():
        raise UserError(
            "this model has no image processor (no preprocessor_config.json in its "
            "directory), so images cannot be prepared for it",
            param="model",
        )
    return AutoImageProcessor.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def load_image_body(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    resident: ResidentLoader | None = None,
) -> torch.nn.Module:
    """The vision backbone without its pretraining head (AutoModel), from local files only,
    or built from the resident weights (`resident`)."""
    if resident is not None:
        return resident.load(load_image_body, path, dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    options: dict[str, Any] = {}
    if config.model_type in _NO_POOLER_TYPES:
        options["add_pooling_layer"] = False  # the head reads the CLS state
    return from_model_dir(AutoModel, path, dtype=dtype, device=device, **options)


# ---------------------------------------------------------------------------------------
# Decoding and preprocessing
# ---------------------------------------------------------------------------------------


def _preprocess(
    examples: Sequence[Example], processor: Any, ids: dict[str, int], param: str
) -> Dataset:
    """Decode and preprocess every image, a chunk at a time; report every bad image at once."""
    out: list[ImageExample] = []
    problems: list[LineError] = []
    for start in range(0, len(examples), _PROCESS_CHUNK):
        chunk = examples[start : start + _PROCESS_CHUNK]
        images = []
        for e in chunk:
            try:
                images.append(decode_image(e.record["image"]))
            except ImageProblem as problem:
                problems.append(LineError(e.line, str(problem), "image"))
        if problems:
            continue  # keep decoding only to find the other bad images
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].float()
        out += [
            ImageExample(e.line, values.contiguous(), ids[str(e.record["label"])])
            for e, values in zip(chunk, pixels, strict=True)
        ]
    if problems:
        n = len(problems)
        raise DataError(
            f"{n} image{'s' if n != 1 else ''} could not be read",
            param=param,
            errors=problems[:MAX_REPORTED_ERRORS],
            total_errors=n,
        )
    return Dataset(out, longest=1)


IMAGE_CLASSIFICATION = ImageClassificationTask()
