"""The label sets of the classification tasks, and class weights.

A label set is the training data's labels, as strings: integers in numeric order, otherwise
sorted. A tag set (IOB2) is `O`, then `B-` and `I-` of each entity type seen. A validation
example with a label or tag the training data lacks is a DataError on its line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from peft_engine.data.formats import MAX_REPORTED_ERRORS, Example
from peft_engine.errors import DataError, LineError, SpecError


def label_ids(
    train: Sequence[Example], validation: Sequence[Example], validation_param: str
) -> tuple[tuple[str, ...], dict[str, int]]:
    """The training data's labels and their ids; the validation data's must be among them."""
    labels = label_set(e.record["label"] for e in train)
    ids = {label: i for i, label in enumerate(labels)}
    _check_known_labels(validation, ids, validation_param)
    return labels, ids


def tag_ids(
    train: Sequence[Example], validation: Sequence[Example], validation_param: str
) -> tuple[tuple[str, ...], dict[str, int]]:
    """The training data's tags and their ids; the validation data's must be among them."""
    tags = tag_set(tag for e in train for tag in e.record["tags"])
    ids = {tag: i for i, tag in enumerate(tags)}
    _check_known_tags(validation, ids, validation_param)
    return tags, ids


def class_weight_options(
    option: str | dict[str, float] | None, labels: Sequence[str], train: Sequence[Example]
) -> dict[str, Any]:
    """The task option `class_weights` (a weight per label, in id order), when asked for."""
    if option is None:
        return {}
    counts = Counter(str(e.record["label"]) for e in train)
    return {"class_weights": class_weights(option, labels, counts)}


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
        errors=problems[:MAX_REPORTED_ERRORS],
        total_errors=len(problems),
    )
