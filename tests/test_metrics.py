"""Classification and entity metrics: hand-worked cases, then cross-checks against
scikit-learn and seqeval (default, conlleval-compatible mode) on random data."""

from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from peft_engine.metrics import classification_metrics, entity_metrics, extract_entities

TOL = 1e-12
TYPES = ["PER", "LOC", "ORG"]
TAGS = ["O", *(f"{prefix}-{type_}" for type_ in TYPES for prefix in "BI")]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=0.0, abs_tol=TOL)


# --- classification, by hand ------------------------------------------------------------


def test_confusion_matrix_and_scores_worked_by_hand():
    labels = ["cat", "dog", "bird"]
    y_true = [0, 0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 0, 1, 0, 2, 1, 1]
    m = classification_metrics(y_true, y_pred, labels)

    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [0, 2, 1]]
    assert m["labels"] == labels
    assert m["accuracy"] == 0.5
    # cat: tp 2 of 3 predicted, 3 true; dog: tp 1 of 4 predicted, 2 true; bird: 1 of 1, 3 true
    assert m["per_class"]["cat"] == pytest.approx(
        {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    )
    assert m["per_class"]["dog"] == pytest.approx(
        {"precision": 1 / 4, "recall": 1 / 2, "f1": 1 / 3, "support": 2}
    )
    assert m["per_class"]["bird"] == pytest.approx(
        {"precision": 1.0, "recall": 1 / 3, "f1": 1 / 2, "support": 3}
    )
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)


def test_label_never_predicted_or_never_seen_counts_zero_in_macro_f1():
    labels = ["a", "b", "c", "d"]  # "c" is never predicted, "d" appears nowhere
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], labels)

    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["b"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    )
    assert m["macro_f1"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.0) / 4)
    assert m["accuracy"] == 0.5
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]


def test_empty_classification_input_is_all_zero():
    m = classification_metrics([], [], ["x", "y"])
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0
    assert m["confusion_matrix"] == [[0, 0], [0, 0]]
    assert m["per_class"]["x"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert classification_metrics([], [], [])["macro_f1"] == 0.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "labels", "message"),
    [
        ([0, 1], [0], ["a", "b"], "2 true labels but 1 predictions"),
        ([0, 2], [0, 1], ["a", "b"], r"y_true\[1\] = 2"),
        ([0], [-1], ["a", "b"], r"y_pred\[0\] = -1"),
        ([0], [0], ["a", "a"], "distinct"),
    ],
)
def test_classification_rejects_bad_input(y_true, y_pred, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(y_true, y_pred, labels)


# --- entity spans, by hand --------------------------------------------------------------


@pytest.mark.parametrize(
    ("tags", "expected"),
    [
        ([], []),
        (["O", "O"], []),
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        # I- after O opens an entity (IOB1 / conlleval), also at the sentence start
        (["O", "I-PER", "I-PER", "O"], [("PER", 1, 3)]),
        (["I-LOC", "O"], [("LOC", 0, 1)]),
        # a type change mid-entity closes it and opens another
        (["B-PER", "I-PER", "I-LOC", "I-LOC", "O"], [("PER", 0, 2), ("LOC", 2, 4)]),
        (["B-PER", "I-LOC"], [("PER", 0, 1), ("LOC", 1, 2)]),
        # B- always opens a new entity, even after one of the same type
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        (["I-PER", "B-PER"], [("PER", 0, 1), ("PER", 1, 2)]),
        # an entity running to the end of the sentence is closed there
        (["O", "B-ORG", "I-ORG"], [("ORG", 1, 3)]),
        (["B-MISC"], [("MISC", 0, 1)]),
        # the type is everything after the first hyphen
        (["B-WORK-OF-ART", "I-WORK-OF-ART"], [("WORK-OF-ART", 0, 2)]),
    ],
)
def test_extract_entities(tags, expected):
    assert extract_entities(tags) == expected


@pytest.mark.parametrize("tag", ["PER", "B", "B-", "E-PER", "S-PER", "b-PER", ""])
def test_extract_entities_rejects_non_iob_tags(tag):
    with pytest.raises(ValueError, match="not an IOB tag"):
        extract_entities(["O", tag])


# --- entity metrics, by hand ------------------------------------------------------------


def test_entity_metrics_worked_by_hand():
    y_true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    y_pred = [["B-PER", "I-PER", "O", "B-ORG"], ["O", "B-ORG", "O", "O"]]
    m = entity_metrics(y_true, y_pred)

    # true: PER 0-2, LOC 3-4 | ORG 1-3; predicted: PER 0-2, ORG 3-4 | ORG 1-2. Only PER matches
    # (the right span with the wrong type, or the right type with a short span, does not).
    assert m["entity_precision"] == pytest.approx(1 / 3)
    assert m["entity_recall"] == pytest.approx(1 / 3)
    assert m["entity_f1"] == pytest.approx(1 / 3)
    assert m["token_accuracy"] == 0.75
    assert list(m["per_type"]) == ["LOC", "ORG", "PER"]
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_type"]["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_predicted_only_type_appears_with_zero_support():
    m = entity_metrics([["O", "B-PER"]], [["B-LOC", "B-PER"]])
    assert m["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["entity_precision"] == 0.5 and m["entity_recall"] == 1.0
    assert m["entity_f1"] == pytest.approx(2 / 3)


def test_same_span_in_another_sentence_is_not_a_match():
    m = entity_metrics([["B-PER"], ["O"]], [["O"], ["B-PER"]])
    assert (m["entity_precision"], m["entity_recall"], m["entity_f1"]) == (0.0, 0.0, 0.0)


def test_no_entities_and_no_input_give_zero_scores():
    m = entity_metrics([["O", "O"]], [["O", "O"]])
    assert (m["entity_precision"], m["entity_recall"], m["entity_f1"]) == (0.0, 0.0, 0.0)
    assert m["token_accuracy"] == 1.0 and m["per_type"] == {}
    empty = entity_metrics([], [])
    assert empty["token_accuracy"] == 0.0 and empty["entity_f1"] == 0.0


def test_entity_metrics_rejects_mismatched_sentences():
    with pytest.raises(ValueError, match="sentence 1: 2 true tags but 1 predicted"):
        entity_metrics([["O"], ["O", "B-PER"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 true sentences but 1 predicted"):
        entity_metrics([["O"], ["O"]], [["O"]])
    with pytest.raises(ValueError, match="sentence 0: expected a list of tags"):
        entity_metrics(["O"], ["O"])


def test_module_needs_no_torch_sklearn_or_seqeval():
    code = (
        "import sys, peft_engine.metrics; "
        "bad = {'torch', 'sklearn', 'seqeval'} & {m.split('.')[0] for m in sys.modules}; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- cross-checks against scikit-learn and seqeval --------------------------------------


def _random_classification(rng: random.Random) -> tuple[list[int], list[int], list[str]]:
    n_labels = rng.randint(1, 6)
    length = rng.randint(1, 40)
    y_true = [rng.randrange(n_labels) for _ in range(length)]
    # mostly right, so that every cell of the confusion matrix is exercised
    y_pred = [t if rng.random() < 0.5 else rng.randrange(n_labels) for t in y_true]
    return y_true, y_pred, [f"label{k}" for k in range(n_labels)]


@pytest.mark.filterwarnings("ignore")
def test_classification_agrees_with_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1234)
    for _ in range(200):
        y_true, y_pred, labels = _random_classification(rng)
        ids = list(range(len(labels)))
        m = classification_metrics(y_true, y_pred, labels)

        assert _close(m["accuracy"], skm.accuracy_score(y_true, y_pred))
        macro = skm.f1_score(y_true, y_pred, average="macro", labels=ids, zero_division=0)
        assert _close(m["macro_f1"], macro)
        cm = skm.confusion_matrix(y_true, y_pred, labels=ids)
        assert m["confusion_matrix"] == cm.tolist()
        p, r, f, s = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=ids, zero_division=0
        )
        for k, label in enumerate(labels):
            row = m["per_class"][label]
            assert _close(row["precision"], p[k]) and _close(row["recall"], r[k])
            assert _close(row["f1"], f[k]) and row["support"] == s[k]


def _random_sentence(rng: random.Random, length: int) -> list[str]:
    # heavy on O, with enough stray I- tags to exercise IOB1 starts and type changes
    return [rng.choice(TAGS) if rng.random() < 0.6 else "O" for _ in range(length)]


def _noisy_copy(rng: random.Random, tags: list[str]) -> list[str]:
    return [t if rng.random() < 0.8 else rng.choice(TAGS) for t in tags]


def _random_corpus(rng: random.Random, n: int) -> tuple[list[list[str]], list[list[str]]]:
    y_true = [_random_sentence(rng, rng.randint(0, 15)) for _ in range(n)]
    return y_true, [_noisy_copy(rng, tags) for tags in y_true]


def test_extract_entities_agrees_with_seqeval_get_entities():
    seq = pytest.importorskip("seqeval.metrics.sequence_labeling")
    rng = random.Random(99)
    for _ in range(500):
        tags = _random_sentence(rng, rng.randint(0, 20))
        expected = [(t, start, end + 1) for t, start, end in seq.get_entities(tags)]
        assert extract_entities(tags) == expected, tags


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("seed", range(8))
def test_entity_metrics_agree_with_seqeval(seed):
    sm = pytest.importorskip("seqeval.metrics")
    rng = random.Random(seed)
    y_true, y_pred = _random_corpus(rng, rng.randint(20, 80))
    m = entity_metrics(y_true, y_pred)

    assert _close(m["entity_precision"], sm.precision_score(y_true, y_pred))
    assert _close(m["entity_recall"], sm.recall_score(y_true, y_pred))
    assert _close(m["entity_f1"], sm.f1_score(y_true, y_pred))
    assert _close(m["token_accuracy"], sm.accuracy_score(y_true, y_pred))

    report = sm.classification_report(y_true, y_pred, output_dict=True)
    per_type = {name: row for name, row in report.items() if not name.endswith(" avg")}
    assert sorted(per_type) == list(m["per_type"])
    for name, row in per_type.items():
        ours = m["per_type"][name]
        assert _close(ours["precision"], row["precision"])
        assert _close(ours["recall"], row["recall"])
        assert _close(ours["f1"], row["f1-score"])
        assert ours["support"] == row["support"]
