"""Token classification: a tag per word, `{"tokens": [...], "tags": [...]}` with IOB2 tags.

The words are joined with spaces and tokenized once with offsets; a word's tag goes on its
first sub-token and the other sub-tokens carry no loss. Evaluation reads the prediction at
each word's first sub-token and scores entities with seqeval's semantics (an entity counts
only when its span and type are exact); words cut off by `max_seq_length` count as
predicted `O`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from peft_engine.data.formats import Example
from peft_engine.data.tokenize import IGNORE
from peft_engine.errors import DataError
from peft_engine.metrics import entity_metrics
from peft_engine.tasks.base import Dataset, ExampleLosses, ExampleResult, LossSum, TaskData
from peft_engine.tasks.classification import ClassificationTask, LabelledBatch, LabelledExample
from peft_engine.tasks.labels import tag_ids


class TokenClassificationTask(ClassificationTask):
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
        tags, ids = tag_ids(train, validation, validation_param)
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
        per_token = _token_losses(logits, batch)
        with torch.no_grad():
            keep = batch.labels != IGNORE
            correct = int(((logits.argmax(-1) == batch.labels) & keep).sum())
        examples = ExampleLosses(
            tuple(e.line for e in batch.examples),
            per_token.detach().sum(dim=1),
            tuple(e.n_loss_tokens for e in batch.examples),
        )
        return LossSum(per_token.sum(), batch.n_loss_tokens, correct, examples)

    @torch.no_grad()
    def evaluate(
        self, model: Any, batches: Iterable[LabelledBatch], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
        was_training = model.training
        model.eval()
        tags = list(job.labels)
        truth: list[list[str]] = []
        predicted: list[list[str]] = []
        examples: list[ExampleResult] = []
        for batch in batches:
            batch = batch.to(device)
            logits = _token_logits(model, batch)
            losses = _token_losses(logits, batch).sum(dim=1).tolist()
            best = logits.argmax(-1).tolist()
            for row, example in enumerate(batch.examples):
                gold = [tags[t] for t in example.word_tags]
                guess = [tags[best[row][s]] if s >= 0 else "O" for s in example.word_starts]
                truth.append(gold)
                predicted.append(guess)
                mistakes = tuple((g, p) for g, p in zip(gold, guess, strict=True) if g != p)
                examples.append(
                    ExampleResult(
                        example.line, losses[row], example.n_loss_tokens, mistakes=mistakes
                    )
                )
        model.train(was_training)
        report = entity_metrics(truth, predicted)
        words = sum(e.n_items for e in examples)
        metrics = {
            "eval_loss": sum(e.loss for e in examples) / max(words, 1),
            "entity_f1": report["entity_f1"],
            "entity_precision": report["entity_precision"],
            "entity_recall": report["entity_recall"],
            "token_accuracy": report["token_accuracy"],
        }
        return metrics, {"per_type": report["per_type"]}, examples

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, entity F1 {metrics['entity_f1']:.4f} "
            f"(precision {metrics['entity_precision']:.4f}, "
            f"recall {metrics['entity_recall']:.4f})"
        )


def _token_losses(logits: torch.Tensor, batch: LabelledBatch) -> torch.Tensor:
    """(rows, length) cross-entropy at each labelled sub-token, 0 elsewhere."""
    flat = F.cross_entropy(
        logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return flat.view(batch.labels.shape)


def _token_logits(model: Any, batch: LabelledBatch) -> torch.Tensor:
    logits = model(**batch.model_inputs()).logits.float()
    # prompt tuning puts virtual tokens in front: their positions carry no label
    return logits[:, logits.shape[1] - batch.labels.shape[1] :]


def joined_words(words: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """The words joined with spaces, as the model reads them, and each word's span in it."""
    spans, offset = [], 0
    for word in words:
        spans.append((offset, offset + len(word)))
        offset += len(word) + 1
    return " ".join(words), spans


def first_subtokens(
    text: str, spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]
) -> list[int]:
    """Each word's first sub-token (its position in the tokens the offsets describe), or -1
    for a word the tokens do not reach (cut off by the length limit)."""
    starts = [s for s, _ in spans]
    word_starts = [-1] * len(spans)
    for position, (lo, hi) in enumerate(offsets):
        while lo < hi and text[lo].isspace():  # byte-level BPE folds the space in front
            lo += 1
        if lo >= hi:
            continue  # a special token
        word = bisect.bisect_right(starts, lo) - 1
        if word >= 0 and word_starts[word] < 0 and lo < spans[word][1]:
            word_starts[word] = position
    return word_starts


def _encode_words(
    examples: Sequence[Example], tokenizer: Any, ids: dict[str, int], max_seq_length: int
) -> Dataset:
    joined = [joined_words(e.record["tokens"]) for e in examples]
    texts = [text for text, _ in joined]
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
        word_starts = first_subtokens(*joined[i], encoded["offset_mapping"][i])
        labels = [IGNORE] * len(encoded["input_ids"][i])
        for word, position in enumerate(word_starts):
            if position >= 0:
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


TOKEN_CLASSIFICATION = TokenClassificationTask()
