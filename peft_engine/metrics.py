"""Evaluation metrics for classification and sequence-labelling (NER) fine-tunes.

Pure Python, no torch, scikit-learn or seqeval needed; the results agree with those
libraries, and the test suite cross-checks them.

Classification (`classification_metrics`)
    Predictions and gold labels are integer indices into `labels`. Per-class precision,
    recall and F1 follow scikit-learn's `precision_recall_fscore_support` with
    `labels=range(len(labels))` and `zero_division=0`: a score whose denominator is zero
    is 0.0. Macro-F1 is the unweighted mean of the per-class F1 over *every* label in
    `labels`, including labels that never occur in either sequence (they contribute 0.0).
    The confusion matrix has one row per true label and one column per predicted label,
    both in `labels` order. Empty input gives 0.0 everywhere rather than an error.

Entities (`extract_entities`, `entity_metrics`)
    Tags are "O", "B-TYPE" or "I-TYPE" (IOB2, or IOB1 where "I-" may open an entity).
    Spans are decoded with seqeval's default, conlleval-compatible rules (not its strict
    mode): "B-X" always opens a new entity; "I-X" continues an open entity of type X and
    otherwise (after "O", or after an entity of another type) opens a new one; "O" closes
    any open entity, as does the end of the sentence. A predicted entity is correct only
    if its type, start and end all match a true entity. Overall precision, recall and F1
    are micro-averaged over entities of all types, as seqeval's `precision_score`,
    `recall_score` and `f1_score` with their defaults; a zero denominator gives 0.0.
    `per_type` covers every type seen in the true or the predicted tags, with support the
    number of true entities of that type. Token accuracy is the fraction of tags that are
    equal, over all sentences.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Sequence
from typing import TypedDict

__all__ = [
    "ClassificationMetrics",
    "Entity",
    "EntityMetrics",
    "ScoreRow",
    "classification_metrics",
    "entity_metrics",
    "extract_entities",
]

Entity = tuple[str, int, int]  # (type, start, end exclusive)


class ScoreRow(TypedDict):
    """Precision, recall and F1 of one class or entity type, and its true count."""

    precision: float
    recall: float
    f1: float
    support: int


class ClassificationMetrics(TypedDict):
    """What `classification_metrics` returns."""

    accuracy: float
    macro_f1: float
    per_class: dict[str, ScoreRow]
    confusion_matrix: list[list[int]]
    labels: list[str]


class EntityMetrics(TypedDict):
    """What `entity_metrics` returns."""

    entity_precision: float
    entity_recall: float
    entity_f1: float
    token_accuracy: float
    per_type: dict[str, ScoreRow]


def _ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator, or 0.0 when the denominator is zero."""
    return numerator / denominator if denominator else 0.0


def _score_row(tp: int, n_pred: int, n_true: int) -> ScoreRow:
    """Precision, recall and F1 from counts of true positives, predictions and truths."""
    # F1 = 2tp / (2tp + fp + fn), which equals 2PR / (P + R) and is 0 when tp is 0.
    return {
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_true),
        "f1": _ratio(2 * tp, n_pred + n_true),
        "support": n_true,
    }


# --- classification ---------------------------------------------------------------------


def _check_indices(name: str, values: Sequence[int], n_labels: int) -> list[int]:
    """The values as plain ints, each checked to index into the labels."""
    out = []
    for position, value in enumerate(values):
        index = operator.index(value)
        if not 0 <= index < n_labels:
            raise ValueError(
                f"{name}[{position}] = {index} is not a label index (0..{n_labels - 1})"
            )
        out.append(index)
    return out


def _confusion_matrix(y_true: list[int], y_pred: list[int], n_labels: int) -> list[list[int]]:
    """Counts with rows indexed by the true label and columns by the predicted label."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(y_true, y_pred, strict=True):
        matrix[t][p] += 1
    return matrix


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], labels: Sequence[str]
) -> ClassificationMetrics:
    """Accuracy, macro-F1, per-class scores and the confusion matrix of label indices."""
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be distinct, got {names}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    n = len(names)
    truth = _check_indices("y_true", y_true, n)
    pred = _check_indices("y_pred", y_pred, n)

    matrix = _confusion_matrix(truth, pred, n)
    n_true = [sum(row) for row in matrix]
    n_pred = [sum(column) for column in zip(*matrix, strict=True)] if n else []
    per_class = {names[k]: _score_row(matrix[k][k], n_pred[k], n_true[k]) for k in range(n)}
    correct = sum(matrix[k][k] for k in range(n))
    return {
        "accuracy": _ratio(correct, len(truth)),
        "macro_f1": _ratio(sum(row["f1"] for row in per_class.values()), n),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "labels": names,
    }


# --- entities ---------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """("O", "") for "O", else the prefix ("B" or "I") and the entity type."""
    if tag == "O":
        return "O", ""
    prefix, sep, type_ = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not type_:
        raise ValueError(f"not an IOB tag: {tag!r} (expected 'O', 'B-TYPE' or 'I-TYPE')")
    return prefix, type_


def extract_entities(tags: Sequence[str]) -> list[Entity]:
    """Entity spans (type, start, end exclusive) of one sentence, in order of start."""
    entities: list[Entity] = []
    open_type: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        prefix, type_ = _split_tag(tag)
        continues = prefix == "I" and type_ == open_type
        if open_type is not None and not continues:
            entities.append((open_type, start, i))
            open_type = None
        if prefix != "O" and not continues:
            open_type, start = type_, i
    if open_type is not None:
        entities.append((open_type, start, len(tags)))
    return entities


def _check_sentences(y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]) -> None:
    """Raise ValueError unless both hold the same number of equally long tag lists."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true sentences but {len(y_pred)} predicted")
    for i, (true_tags, pred_tags) in enumerate(zip(y_true, y_pred, strict=True)):
        if isinstance(true_tags, str) or isinstance(pred_tags, str):
            raise ValueError(f"sentence {i}: expected a list of tags, got a string")
        if len(true_tags) != len(pred_tags):
            raise ValueError(
                f"sentence {i}: {len(true_tags)} true tags but {len(pred_tags)} predicted"
            )


def _entity_sets(sentences: Sequence[Sequence[str]]) -> set[tuple[int, str, int, int]]:
    """Every entity of every sentence as (sentence index, type, start, end exclusive)."""
    return {
        (i, type_, start, end)
        for i, tags in enumerate(sentences)
        for type_, start, end in extract_entities(tags)
    }


def entity_metrics(
    y_true: Sequence[Sequence[str]], y_pred: Sequence[Sequence[str]]
) -> EntityMetrics:
    """Exact-match entity precision, recall and F1 (micro and per type) and token accuracy."""
    _check_sentences(y_true, y_pred)
    true_entities = _entity_sets(y_true)
    pred_entities = _entity_sets(y_pred)
    correct = true_entities & pred_entities

    n_true = Counter(entity[1] for entity in true_entities)
    n_pred = Counter(entity[1] for entity in pred_entities)
    n_correct = Counter(entity[1] for entity in correct)
    per_type = {
        type_: _score_row(n_correct[type_], n_pred[type_], n_true[type_])
        for type_ in sorted(n_true.keys() | n_pred.keys())
    }
    overall = _score_row(len(correct), len(pred_entities), len(true_entities))

    n_tokens = sum(len(tags) for tags in y_true)
    n_equal = sum(
        t == p
        for true_tags, pred_tags in zip(y_true, y_pred, strict=True)
        for t, p in zip(true_tags, pred_tags, strict=True)
    )
    return {
        "entity_precision": overall["precision"],
        "entity_recall": overall["recall"],
        "entity_f1": overall["f1"],
        "token_accuracy": _ratio(n_equal, n_tokens),
        "per_type": per_type,
    }
