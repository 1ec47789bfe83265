"""Per-example diagnostics (issue 15): each example's loss, summed from the loss the batch
computes anyway, lands on the right line; the worst validation lines, the hardest training
lines and the confused label pairs are the ones the data makes hard.

Tiny random models; nothing is timed (bench/diagnostics_overhead.py measures the cost).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from peft_engine import DataPaths, train
from peft_engine.data.batching import pack, pad
from peft_engine.data.examples import DataFormat, Example
from peft_engine.diagnostics import DiagnosticsState, confusions, preview, summarise_eval
from peft_engine.loss import batch_loss
from peft_engine.methods.lora import LoraMethod, build_lora
from peft_engine.models import load_registry
from peft_engine.prepare import prepare_job
from peft_engine.spec import parse_spec
from peft_engine.tasks import task_for
from peft_engine.tasks.base import ExampleResult
from tests.conftest import build_tiny_bert, chat, local_model, write_jsonl, write_registry
from tests.engine_helpers import randomise_lora_b, sdpa_llama, tokenized_chat_examples

# ---------------------------------------------------------------------------------------
# Per-example losses add up to the batch's loss, each on its own example's line
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("packing", [True, False])
def test_causal_lm_example_losses_are_each_examples_own_loss(
    tiny_model_dir, tiny_tokenizer, packing, fused
):
    examples = tokenized_chat_examples(tiny_tokenizer)
    torch.manual_seed(0)
    model = build_lora(sdpa_llama(tiny_model_dir, packing), LoraMethod(dropout=0.0), "causal_lm")
    randomise_lora_b(model)
    collate = pack if packing else (lambda group: pad(group, 0))

    with torch.no_grad():
        result = batch_loss(model, collate(examples), fused=fused)
        alone = [float(batch_loss(model, collate([e]), fused=fused).loss) for e in examples]

    per_example = result.examples
    assert per_example is not None
    assert per_example.lines == tuple(e.line for e in examples) == (1, 2, 3, 4)
    assert per_example.n_items == tuple(e.n_loss_tokens for e in examples)
    assert float(per_example.loss.sum()) == pytest.approx(float(result.loss), rel=1e-5)
    assert per_example.loss.tolist() == pytest.approx(alone, rel=1e-4)


def test_the_per_example_sums_leave_the_loss_and_its_gradient_as_they_were(
    tiny_model_dir, tiny_tokenizer
):
    batch = pack(tokenized_chat_examples(tiny_tokenizer))
    model = sdpa_llama(tiny_model_dir, True)
    grads = {}
    for per_example in (True, False):
        model.zero_grad()
        result = batch_loss(model, batch, per_example=per_example)
        result.loss.backward()
        assert (result.examples is not None) == per_example
        grads[per_example] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, msg=name)


SENTIMENT = {"good": "positive", "great": "positive", "awful": "negative", "bad": "negative"}
REVIEWS = [
    {"text": f"the {noun} was {word}", "label": label}
    for noun in ("film", "movie", "plot")
    for word, label in SENTIMENT.items()
]
SENTENCES = [
    {"tokens": ["alice", "visited", "paris"], "tags": ["B-PER", "O", "B-LOC"]},
    {
        "tokens": ["bob", "saw", "rome", "and", "carol"],
        "tags": ["B-PER", "O", "B-LOC", "O", "B-PER"],
    },
    {"tokens": ["the", "film", "was", "good"], "tags": ["O", "O", "O", "O"]},
    {
        "tokens": ["dave", "met", "alice", "in", "oslo"],
        "tags": ["B-PER", "O", "B-PER", "O", "B-LOC"],
    },
]


@pytest.fixture(scope="module")
def bert_registry(tmp_path_factory):
    directory = build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    entry = local_model(directory, "bert", ["seq_classification", "token_classification"])
    path = tmp_path_factory.mktemp("registry") / "models.json"
    return load_registry(write_registry(path, {"tiny-bert": entry}))


def _prepared(task: str, rows: list[dict], tmp_path: Path, registry, cache_dir, **hp):
    pooling = {"pooling": "mean"} if task == "seq_classification" else {}
    hyperparameters = {"batch_size": 4, "n_epochs": 1} | pooling | hp
    spec = parse_spec(
        {
            "model": "tiny-bert",
            "task": task,
            "validation_split": 0,
            "hyperparameters": hyperparameters,
        }
    )
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", rows))
    job = prepare_job(spec, data, registry=registry, cache_dir=cache_dir)
    handler = task_for(task)
    torch.manual_seed(0)
    model = handler.load_model(job, dtype=torch.float32, device=torch.device("cpu")).eval()
    return job, handler, model


@pytest.mark.parametrize(
    ("task", "rows", "hp"),
    [
        ("seq_classification", REVIEWS, {}),
        ("seq_classification", REVIEWS, {"class_weights": "balanced"}),
        ("token_classification", SENTENCES, {}),
    ],
)
def test_classifier_example_losses_are_each_examples_own_loss(
    task, rows, hp, tmp_path, bert_registry, cache_dir
):
    job, handler, model = _prepared(task, rows, tmp_path, bert_registry, cache_dir, **hp)
    examples = job.train.examples[:4]

    with torch.no_grad():
        result = handler.loss(model, handler.collate(examples, job), job)
        alone = [float(handler.loss(model, handler.collate([e], job), job).loss) for e in examples]

    assert result.examples is not None
    assert result.examples.lines == tuple(e.line for e in examples)
    assert result.examples.n_items == tuple(e.n_loss_tokens for e in examples)
    assert float(result.examples.loss.sum()) == pytest.approx(float(result.loss), rel=1e-5)
    assert result.examples.loss.tolist() == pytest.approx(alone, rel=1e-4)


@pytest.mark.parametrize("task", ["seq_classification", "token_classification"])
def test_evaluation_results_name_the_lines_and_labels(task, tmp_path, bert_registry, cache_dir):
    rows = REVIEWS if task == "seq_classification" else SENTENCES
    job, handler, model = _prepared(task, rows, tmp_path, bert_registry, cache_dir)
    examples = job.train.examples
    batches = [handler.collate(examples[i : i + 3], job) for i in range(0, len(examples), 3)]

    metrics, _, results = handler.evaluate(model, batches, torch.device("cpu"), job)

    assert [r.line for r in results] == [e.line for e in examples]
    assert sum(r.loss for r in results) / sum(r.n_items for r in results) == pytest.approx(
        metrics["eval_loss"], rel=1e-5
    )
    with torch.no_grad():  # each example's loss is its own, however it was batched
        for example, got in zip(examples, results, strict=True):
            alone = handler.loss(model, handler.collate([example], job), job)
            assert got.loss == pytest.approx(float(alone.loss), rel=1e-4)
    if task == "seq_classification":
        accuracy = sum(r.gold == r.predicted for r in results) / len(results)
        assert accuracy == pytest.approx(metrics["accuracy"])
        assert all(r.gold == rows[r.line - 1]["label"] for r in results)
        assert all(bool(r.mistakes) == (r.gold != r.predicted) for r in results)
    else:
        for r in results:
            gold = rows[r.line - 1]["tags"]
            assert all(g in gold for g, _ in r.mistakes)


# ---------------------------------------------------------------------------------------
# The summaries: worst examples, confused pairs
# ---------------------------------------------------------------------------------------


def test_confused_pairs_are_counted_with_their_lines():
    results = [
        ExampleResult(1, 0.1, 1, "cat", "cat"),
        ExampleResult(2, 2.0, 1, "cat", "dog", (("cat", "dog"),)),
        ExampleResult(3, 0.5, 1, "dog", "dog"),
        ExampleResult(4, 1.5, 1, "cat", "dog", (("cat", "dog"),)),
        ExampleResult(5, 3.0, 1, "dog", "bird", (("dog", "bird"),)),
        # token classification: several wrong words in one sentence, each counted
        ExampleResult(6, 4.0, 4, mistakes=(("B-PER", "O"), ("B-PER", "O"), ("O", "B-LOC"))),
    ]

    pairs = confusions(results)

    assert [(p["gold"], p["predicted"], p["count"], p["lines"]) for p in pairs] == [
        ("B-PER", "O", 2, [6]),
        ("cat", "dog", 2, [2, 4]),
        ("O", "B-LOC", 1, [6]),
        ("dog", "bird", 1, [5]),
    ]
    summary = summarise_eval(7, results)
    assert summary["examples"] == 6
    # ranked by loss per item: line 6's 4.0 over 4 words is 1.0
    assert [w["line"] for w in summary["worst"]] == [5, 2, 4, 6, 3, 1]
    assert summary["worst"][0] == {
        "line": 5,
        "loss": 3.0,
        "n_items": 1,
        "gold": "dog",
        "predicted": "bird",
    }


def test_the_state_round_trips_through_json():
    state = DiagnosticsState()
    state.record_eval(3, [ExampleResult(2, 1.0, 2, "a", "b", (("a", "b"),))])
    state.keep_best()
    from peft_engine.tasks.base import ExampleLosses

    state.train.record(ExampleLosses((7, 9), torch.tensor([2.0, 9.0]), (2, 3)))
    state.train.record(ExampleLosses((7,), torch.tensor([1.0]), (2,)))
    from dataclasses import asdict

    again = DiagnosticsState.from_json(json.loads(json.dumps(asdict(state))))

    assert again == state
    assert again.train.hardest() == [
        {"line": 9, "loss": 3.0, "mean_loss": 3.0, "passes": 1},
        {"line": 7, "loss": 0.5, "mean_loss": 0.75, "passes": 2},
    ]


def test_previews_are_one_short_line_of_the_record():
    long = "word " * 100
    cases = {
        DataFormat.CHAT: chat("Hi\nthere", "Hello."),
        DataFormat.PROMPT_COMPLETION: {"prompt": "2+2", "completion": "4"},
        DataFormat.TEXT: {"text": long},
        DataFormat.CLASSIFICATION: {"text_a": "a", "text_b": "b", "label": "x"},
        DataFormat.TOKEN_CLASSIFICATION: {"tokens": ["alice", "met", "bob"], "tags": ["O"] * 3},
        DataFormat.IMAGE_CLASSIFICATION: {"image": "iVBORw0KGgo=", "label": "cat"},
    }
    got = {f: preview(Example(1, f, record)) for f, record in cases.items()}
    assert got[DataFormat.CHAT] == "user: Hi there | assistant: Hello."
    assert got[DataFormat.PROMPT_COMPLETION] == "2+2 → 4"
    assert len(got[DataFormat.TEXT]) == 200 and got[DataFormat.TEXT].endswith("…")
    assert got[DataFormat.CLASSIFICATION] == "a / b"
    assert got[DataFormat.TOKEN_CLASSIFICATION] == "alice met bob"
    assert got[DataFormat.IMAGE_CLASSIFICATION] == "<inline image>"


# ---------------------------------------------------------------------------------------
# A whole run: the lines the data makes hard are the ones reported
# ---------------------------------------------------------------------------------------

QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
HARD_VALIDATION_LINES = {3, 7}
HARD_TRAINING_LINES = {5, 18, 31}


def _gibberish(rng: random.Random) -> str:
    return "".join(rng.choice("qxzjvkwy ") for _ in range(40))


def test_a_run_reports_the_lines_made_hard(tmp_path, tiny_registry, cache_dir):
    rng = random.Random(0)
    train_rows = [
        chat(f"What is {i} plus {i}?", _gibberish(rng)) if i + 1 in HARD_TRAINING_LINES else row
        for i, row in enumerate(QUESTIONS)
    ]
    validation_rows = [
        chat(f"What is {i} plus {i}?", _gibberish(rng))
        if i - 39 in HARD_VALIDATION_LINES
        else chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.")
        for i in range(40, 50)
    ]
    data = DataPaths(
        write_jsonl(tmp_path / "train.jsonl", train_rows),
        write_jsonl(tmp_path / "validation.jsonl", validation_rows),
    )
    spec = {
        "model": "tiny-llama",
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "eval_every_steps": 10,
            "early_stopping": None,
        },
    }

    result = train(spec, tmp_path / "run", data=data, registry=tiny_registry, cache_dir=cache_dir)

    rows = [
        json.loads(r)
        for r in (result.output_dir / "diagnostics.jsonl").read_text().split("\n")
        if r
    ]
    worst = [r for r in rows if r["kind"] == "worst_validation"]
    hardest = [r for r in rows if r["kind"] == "hardest_training"]
    assert {r["line"] for r in worst[:2]} == HARD_VALIDATION_LINES
    assert {r["line"] for r in hardest[:3]} == HARD_TRAINING_LINES
    assert [r["rank"] for r in worst] == list(range(1, 11))  # every validation line, ranked
    assert worst[0]["file"] == "validation_file" and hardest[0]["file"] == "training_file"
    assert all(r["passes"] == 3 for r in hardest)
    line = worst[0]["line"]
    assert worst[0]["preview"] == preview(Example(line, DataFormat.CHAT, validation_rows[line - 1]))
    assert worst[0]["step"] == result.result["best_step"]
    summary = result.result["diagnostics"]
    assert {w["line"] for w in summary["worst_validation"][:2]} == HARD_VALIDATION_LINES
    assert summary["file"] == "diagnostics.jsonl" and summary["most_confused"] == []


def test_a_classification_run_reports_its_confusions(tmp_path, bert_registry, cache_dir):
    data = DataPaths(
        write_jsonl(tmp_path / "train.jsonl", REVIEWS * 2),
        write_jsonl(tmp_path / "validation.jsonl", REVIEWS),
    )
    spec = {
        "model": "tiny-bert",
        "task": "seq_classification",
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "pooling": "mean"},
    }

    result = train(spec, tmp_path / "run", data=data, registry=bert_registry, cache_dir=cache_dir)

    rows = [
        json.loads(r)
        for r in (result.output_dir / "diagnostics.jsonl").read_text().split("\n")
        if r
    ]
    worst = [r for r in rows if r["kind"] == "worst_validation"]
    pairs = [r for r in rows if r["kind"] == "confused_labels"]
    assert sorted(r["line"] for r in worst) == list(range(1, len(REVIEWS) + 1))
    assert all(r["gold"] == REVIEWS[r["line"] - 1]["label"] for r in worst)
    assert all(r["preview"] == REVIEWS[r["line"] - 1]["text"] for r in worst)
    wrong = {(r["gold"], r["predicted"]): set() for r in worst if r["gold"] != r["predicted"]}
    for r in worst:
        if r["gold"] != r["predicted"]:
            wrong[(r["gold"], r["predicted"])].add(r["line"])
    assert {(p["gold"], p["predicted"]): p["count"] for p in pairs} == {
        pair: len(lines) for pair, lines in wrong.items()
    }
    assert pairs and all(set(p["lines"]) <= wrong[(p["gold"], p["predicted"])] for p in pairs)
    assert result.result["report"]["confusion_matrix"]  # the same evaluation's report
