"""Text classification (one label per example) and token classification (a tag per word).

Sequence classification reads `{"text", "label"}` or `{"text_a", "text_b", "label"}` (JSONL
or CSV); the label set is the training file's labels (integers sort as numbers, strings as
strings), stored in the output with `id2label`. Optional class weights scale each class's
loss (`"balanced"`: n / (classes x count), as scikit-learn does).

Token classification reads `{"tokens": [...], "tags": [...]}` with IOB2 tags. The words are
joined with spaces and tokenized once with offsets; a word's tag goes on its first
sub-token and the other sub-tokens carry no loss. Evaluation reads the prediction at each
word's first sub-token and scores entities with seqeval's semantics (an entity counts only
when its span and type are exact); words cut off by `max_seq_length` count as predicted `O`.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peft_engine.data.formats import Example
from peft_engine.data.tokenize import IGNORE
from peft_engine.errors import DataError, LineError, SpecError
from peft_engine.metrics import classification_metrics, entity_metrics
from peft_engine.tasks import Dataset, LossSum, TaskData

_MAX_REPORTED = 20


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


class _ClassificationTask:
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


class OneLabelTask(_ClassificationTask):
    """One label per example (texts, images): weighted cross-entropy; accuracy, macro-F1,
    and per-class figures with a confusion matrix in the report."""

    def loss(self, model: Any, batch: Any, job: Any) -> LossSum:
        logits = model(**batch.model_inputs()).logits.float()
        weights = job.task_options.get("class_weights")
        weight = torch.tensor(weights, device=logits.device) if weights else None
        loss = F.cross_entropy(logits, batch.labels, weight=weight, reduction="sum")
        with torch.no_grad():
            correct = int((logits.argmax(-1) == batch.labels).sum())
        return LossSum(loss, batch.n_loss_tokens, correct)

    @torch.no_grad()
    def evaluate(
        self, model: Any, batches: Iterable[Any], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        was_training = model.training
        model.eval()
        total, count, truth, predicted = 0.0, 0, [], []
        for batch in batches:
            batch = batch.to(device)
            logits = model(**batch.model_inputs()).logits.float()
            total += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
            count += len(batch.labels)
            truth.extend(batch.labels.tolist())
            predicted.extend(logits.argmax(-1).tolist())
        model.train(was_training)
        report = classification_metrics(truth, predicted, list(job.labels))
        metrics = {
            "eval_loss": total / max(count, 1),
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
        }
        return metrics, {k: report[k] for k in ("labels", "per_class", "confusion_matrix")}

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}"
        )


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
        labels = label_set(e.record["label"] for e in train)
        ids = {label: i for i, label in enumerate(labels)}
        _check_known_labels(validation, ids, validation_param)
        hp = spec.hyperparameters
        pooling = hp.pooling if hp.pooling != "auto" else default_pooling(model_path)
        options = {"pooling": pooling}
        counts = Counter(str(e.record["label"]) for e in train)
        if hp.class_weights is not None:
            options["class_weights"] = class_weights(hp.class_weights, labels, counts)
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


class TokenClassificationTask(_ClassificationTask):
    name = "token_classification"
    unit = "words"

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

        tokenizer = load_tokenizer(model_path)
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                "token classification needs a fast tokenizer (with offsets); this model has none",
                param="model",
            )
        tags = tag_set(tag for e in train for tag in e.record["tags"])
        ids = {tag: i for i, tag in enumerate(tags)}
        _check_known_tags(validation, ids, validation_param)
        return TaskData(
            tokenizer,
            _encode_words(train, tokenizer, ids, max_seq_length),
            _encode_words(validation, tokenizer, ids, max_seq_length) if validation else None,
            labels=tags,
        )

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any:
        from peft_engine.models.heads import TokenClassifier, load_body

        return TokenClassifier(load_body(base_dir, **kwargs), len(info["labels"]))

    def loss(self, model: Any, batch: LabelledBatch, job: Any) -> LossSum:
        logits = _token_logits(model, batch)
        loss = F.cross_entropy(
            logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        with torch.no_grad():
            keep = batch.labels != IGNORE
            correct = int(((logits.argmax(-1) == batch.labels) & keep).sum())
        return LossSum(loss, batch.n_loss_tokens, correct)

    @torch.no_grad()
    def evaluate(
        self, model: Any, batches: Iterable[LabelledBatch], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any]]:
        was_training = model.training
        model.eval()
        tags = list(job.labels)
        total, count = 0.0, 0
        truth: list[list[str]] = []
        predicted: list[list[str]] = []
        for batch in batches:
            batch = batch.to(device)
            logits = _token_logits(model, batch)
            total += float(
                F.cross_entropy(
                    logits.flatten(0, 1),
                    batch.labels.flatten(),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
            count += batch.n_loss_tokens
            best = logits.argmax(-1).tolist()
            for row, example in enumerate(batch.examples):
                truth.append([tags[t] for t in example.word_tags])
                predicted.append(
                    [tags[best[row][s]] if s >= 0 else "O" for s in example.word_starts]
                )
        model.train(was_training)
        report = entity_metrics(truth, predicted)
        metrics = {
            "eval_loss": total / max(count, 1),
            "entity_f1": report["entity_f1"],
            "entity_precision": report["entity_precision"],
            "entity_recall": report["entity_recall"],
            "token_accuracy": report["token_accuracy"],
        }
        return metrics, {"per_type": report["per_type"]}

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, entity F1 {metrics['entity_f1']:.4f} "
            f"(precision {metrics['entity_precision']:.4f}, "
            f"recall {metrics['entity_recall']:.4f})"
        )


def _token_logits(model: Any, batch: LabelledBatch) -> torch.Tensor:
    logits = model(**batch.model_inputs()).logits.float()
    # prompt tuning puts virtual tokens in front: their positions carry no label
    return logits[:, logits.shape[1] - batch.labels.shape[1] :]


# ---------------------------------------------------------------------------------------
# Label sets
# ---------------------------------------------------------------------------------------


def label_set(values: Iterable[Any]) -> tuple[str, ...]:
    """The distinct labels as strings: integers in numeric order, otherwise sorted strings."""
    distinct = set(values)
    if all(isinstance(v, int) for v in distinct):
        return tuple(str(v) for v in sorted(distinct))
    return tuple(sorted(str(v) for v in distinct))


def tag_set(tags: Iterable[str]) -> tuple[str, ...]:
    """`O`, then `B-` and `I-` of every entity type seen, types in alphabetical order."""
    types = sorted({tag[2:] for tag in tags if tag != "O"})
    return ("O", *(f"{prefix}-{kind}" for kind in types for prefix in ("B", "I")))


def class_weights(
    option: str | dict[str, float], labels: Sequence[str], counts: Counter[str]
) -> list[float]:
    if option == "balanced":
        total = sum(counts.values())
        return [total / (len(labels) * counts[label]) for label in labels]
    assert isinstance(option, dict)
    unknown = sorted(set(option) - set(labels))
    if unknown:
        raise SpecError(
            f"no such label in the training file: {', '.join(unknown)} "
            f"(labels: {', '.join(labels)})",
            param="hyperparameters.class_weights",
        )
    return [float(option.get(label, 1.0)) for label in labels]


def _check_known_labels(examples: Sequence[Example], ids: dict[str, int], param: str) -> None:
    unknown = [e for e in examples if str(e.record["label"]) not in ids]
    if unknown:
        _raise_unknown(
            param,
            "labels the training file does not have",
            [
                LineError(
                    e.line,
                    f"label {e.record['label']!r} is not in the training file's "
                    f"labels ({', '.join(ids)})",
                    "label",
                )
                for e in unknown
            ],
        )


def _check_known_tags(examples: Sequence[Example], ids: dict[str, int], param: str) -> None:
    problems = []
    for e in examples:
        for i, tag in enumerate(e.record["tags"]):
            if tag not in ids:
                problems.append(
                    LineError(
                        e.line, f"tag {tag!r} is not in the training file's tags", f"tags[{i}]"
                    )
                )
                break
    if problems:
        _raise_unknown(param, "tags the training file does not have", problems)


def _raise_unknown(param: str, what: str, problems: list[LineError]) -> None:
    raise DataError(
        f"{len(problems)} example{'s' if len(problems) != 1 else ''} with {what}",
        param=param,
        errors=problems[:_MAX_REPORTED],
        total_errors=len(problems),
    )


# ---------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------


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


def _encode_words(
    examples: Sequence[Example], tokenizer: Any, ids: dict[str, int], max_seq_length: int
) -> Dataset:
    texts, word_spans = [], []
    for e in examples:
        spans, offset = [], 0
        for word in e.record["tokens"]:
            spans.append((offset, offset + len(word)))
            offset += len(word) + 1
        texts.append(" ".join(e.record["tokens"]))
        word_spans.append(spans)
    full = tokenizer(texts, add_special_tokens=True)["input_ids"]
    encoded = tokenizer(
        texts,
        truncation=True,
        max_length=max_seq_length,
        add_special_tokens=True,
        return_offsets_mapping=True,
    )
    type_ids = encoded.get("token_type_ids")
    out: list[LabelledExample] = []
    dropped = 0
    for i, e in enumerate(examples):
        text, spans = texts[i], word_spans[i]
        starts = [s for s, _ in spans]
        labels = [IGNORE] * len(encoded["input_ids"][i])
        word_starts = [-1] * len(spans)
        for position, (lo, hi) in enumerate(encoded["offset_mapping"][i]):
            while lo < hi and text[lo].isspace():  # byte-level BPE folds the space in front
                lo += 1
            if lo >= hi:
                continue  # a special token
            word = bisect.bisect_right(starts, lo) - 1
            if word >= 0 and word_starts[word] < 0 and lo < spans[word][1]:
                word_starts[word] = position
                labels[position] = ids[e.record["tags"][word]]
        example = LabelledExample(
            line=e.line,
            input_ids=list(encoded["input_ids"][i]),
            token_type_ids=list(type_ids[i]) if type_ids is not None else None,
            labels=labels,
            truncated=len(full[i]) > max_seq_length,
            word_starts=tuple(word_starts),
            word_tags=tuple(ids[tag] for tag in e.record["tags"]),
        )
        if example.n_loss_tokens == 0:
            dropped += 1
            continue
        out.append(example)
    if not out:
        raise DataError(
            f"no sentence has a word within max_seq_length={max_seq_length}", param="training_file"
        )
    return Dataset(
        out,
        truncated=sum(e.truncated for e in out),
        dropped=dropped,
        longest=max(len(ids_) for ids_ in full),
    )


SEQ_CLASSIFICATION = SequenceClassificationTask()
TOKEN_CLASSIFICATION = TokenClassificationTask()
