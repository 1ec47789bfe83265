"""Text classification: one label per example, and what the classification tasks share.

Sequence classification reads `{"text", "label"}` or `{"text_a", "text_b", "label"}` (JSONL
or CSV); the label set is the training file's labels (`tasks.labels`), stored in the output
with `id2label`. Optional class weights scale each class's loss (`"balanced"`:
n / (classes x count), as scikit-learn does). Token classification (`tasks.token_classification`)
and image classification (`tasks.image`) build on the classes here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peft_engine.data.formats import Example
from peft_engine.data.tokenize import IGNORE
from peft_engine.metrics import classification_metrics
from peft_engine.tasks.base import Dataset, ExampleLosses, ExampleResult, LossSum, TaskData
from peft_engine.tasks.labels import class_weight_options, label_ids


@dataclass(frozen=True)
class LabelledExample:
    """One tokenized example with a class (sequence) or per-token labels (IGNORE elsewhere)."""

    line: int
    input_ids: list[int]
    token_type_ids: list[int] | None
    labels: int | list[int]
    truncated: bool
    # token classification: each word's first sub-token (-1 when cut off), and its tag id
    word_starts: tuple[int, ...] = ()
    word_tags: tuple[int, ...] = ()

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        if isinstance(self.labels, int):
            return 1
        return sum(label != IGNORE for label in self.labels)


@dataclass
class LabelledBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None
    labels: torch.Tensor  # (rows,) or (rows, length)
    n_tokens: int
    n_loss_tokens: int
    examples: Sequence[LabelledExample]

    def to(self, device: torch.device | str) -> LabelledBatch:
        return LabelledBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.token_type_ids is None else self.token_type_ids.to(device),
            self.labels.to(device),
            self.n_tokens,
            self.n_loss_tokens,
            self.examples,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            inputs["token_type_ids"] = self.token_type_ids
        return inputs


def collate_labelled(examples: Sequence[LabelledExample], pad_token_id: int) -> LabelledBatch:
    """Pad on the right to the batch's longest example."""
    rows, length = len(examples), max(len(e.input_ids) for e in examples)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    with_types = examples[0].token_type_ids is not None
    token_type_ids = torch.zeros((rows, length), dtype=torch.long) if with_types else None
    per_token = not isinstance(examples[0].labels, int)
    labels = (
        torch.full((rows, length), IGNORE, dtype=torch.long)
        if per_token
        else torch.tensor([e.labels for e in examples], dtype=torch.long)
    )
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        if token_type_ids is not None and example.token_type_ids is not None:
            token_type_ids[row, :n] = torch.tensor(example.token_type_ids)
        if per_token:
            labels[row, :n] = torch.tensor(example.labels)
    return LabelledBatch(
        input_ids,
        attention_mask,
        token_type_ids,
        labels,
        n_tokens=int(attention_mask.sum()),
        n_loss_tokens=sum(e.n_loss_tokens for e in examples),
        examples=examples,
    )


class ClassificationTask:
    name: str
    unit: str

    def load_model(self, job: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
        from peft_engine.models.resident import resident_loader

        # The body may come from the worker's cache; the head is always new, seeded per job.
        resident = resident_loader(job.spec.method)
        return self.build_model(
            job.model_path, self.model_info(job), dtype=dtype, device=device, resident=resident
        )

    def collate(self, examples: Sequence[LabelledExample], job: Any) -> LabelledBatch:
        return collate_labelled(examples, job.pad_token_id)

    def model_info(self, job: Any) -> dict[str, Any]:
        labels = list(job.labels or ())
        return {
            "task": self.name,
            "labels": labels,
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "label2id": {label: i for i, label in enumerate(labels)},
        }


class OneLabelTask(ClassificationTask):
    """One label per example (texts, images): weighted cross-entropy; accuracy, macro-F1,
    and per-class figures with a confusion matrix in the report."""

    def loss(self, model: Any, batch: Any, job: Any) -> LossSum:
        logits = model(**batch.model_inputs()).logits.float()
        weights = job.task_options.get("class_weights")
        weight = torch.tensor(weights, device=logits.device) if weights else None
        per_example = F.cross_entropy(logits, batch.labels, weight=weight, reduction="none")
        with torch.no_grad():
            correct = int((logits.argmax(-1) == batch.labels).sum())
        examples = ExampleLosses(
            tuple(e.line for e in batch.examples),
            per_example.detach(),
            (1,) * len(batch.examples),
        )
        return LossSum(per_example.sum(), batch.n_loss_tokens, correct, examples)

    @torch.no_grad()
    def evaluate(
        self, model: Any, batches: Iterable[Any], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
        was_training = model.training
        model.eval()
        labels = list(job.labels)
        truth: list[int] = []
        predicted: list[int] = []
        examples: list[ExampleResult] = []
        for batch in batches:
            batch = batch.to(device)
            logits = model(**batch.model_inputs()).logits.float()
            losses = F.cross_entropy(logits, batch.labels, reduction="none").tolist()
            gold, best = batch.labels.tolist(), logits.argmax(-1).tolist()
            truth += gold
            predicted += best
            examples += [
                label_result(e.line, loss, labels[g], labels[b])
                for e, loss, g, b in zip(batch.examples, losses, gold, best, strict=True)
            ]
        model.train(was_training)
        report = classification_metrics(truth, predicted, labels)
        metrics = {
            "eval_loss": sum(e.loss for e in examples) / max(len(examples), 1),
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
        }
        report = {k: report[k] for k in ("labels", "per_class", "confusion_matrix")}
        return metrics, report, examples

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}"
        )


def label_result(line: int, loss: float, gold: str, predicted: str) -> ExampleResult:
    mistakes = ((gold, predicted),) if gold != predicted else ()
    return ExampleResult(line, loss, 1, gold=gold, predicted=predicted, mistakes=mistakes)


class SequenceClassificationTask(OneLabelTask):
    name = "seq_classification"
    unit = "examples"

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
        from peft_engine.models import load_tokenizer
        from peft_engine.models.heads import default_pooling

        tokenizer = load_tokenizer(model_path)
        labels, ids = label_ids(train, validation, validation_param)
        hp = spec.hyperparameters
        pooling = hp.pooling if hp.pooling != "auto" else default_pooling(model_path)
        options = {"pooling": pooling, **class_weight_options(hp.class_weights, labels, train)}
        return TaskData(
            tokenizer,
            _encode_sequences(train, tokenizer, ids, max_seq_length),
            _encode_sequences(validation, tokenizer, ids, max_seq_length) if validation else None,
            labels=labels,
            options=options,
        )

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any:
        from peft_engine.models.heads import SequenceClassifier, load_body

        pooling = info["pooling"]
        body = load_body(base_dir, with_pooler=pooling == "pooler", **kwargs)
        return SequenceClassifier(body, len(info["labels"]), pooling)

    def model_info(self, job: Any) -> dict[str, Any]:
        return {**super().model_info(job), "pooling": job.task_options["pooling"]}


def _encode_sequences(
    examples: Sequence[Example], tokenizer: Any, ids: dict[str, int], max_seq_length: int
) -> Dataset:
    pairs = "text_a" in examples[0].record
    first = [e.record["text_a" if pairs else "text"] for e in examples]
    second = [e.record["text_b"] for e in examples] if pairs else None
    full = tokenizer(first, second, add_special_tokens=True)["input_ids"]
    encoded = tokenizer(
        first, second, truncation=True, max_length=max_seq_length, add_special_tokens=True
    )
    type_ids = encoded.get("token_type_ids")
    out = [
        LabelledExample(
            line=e.line,
            input_ids=list(encoded["input_ids"][i]),
            token_type_ids=list(type_ids[i]) if type_ids is not None else None,
            labels=ids[str(e.record["label"])],
            truncated=len(full[i]) > max_seq_length,
        )
        for i, e in enumerate(examples)
    ]
    return Dataset(
        out,
        truncated=sum(e.truncated for e in out),
        longest=max(len(ids_) for ids_ in full),
    )


SEQ_CLASSIFICATION = SequenceClassificationTask()
