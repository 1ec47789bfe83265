"""The dry run's duration, phase by phase: the evaluations and checkpoints the cadence runs,
the tokens each evaluation reads, the model's loading, each divided by its figure."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from peft_engine.estimate import (
    PHASES,
    Throughput,
    checkpoint_writes,
    estimate_job,
    evaluation_plan,
)
from peft_engine.prepare import DataPaths
from peft_engine.spec import parse_spec
from tests.conftest import chat

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
VALIDATION = [chat(f"Add {i} and {i + 1}, please.", f"That is {2 * i + 1}.") for i in range(5)]
FIGURES = Throughput(
    train_tokens_per_second=200.0,
    eval_tokens_per_second=500.0,
    load_seconds=7.0,
    seconds_per_checkpoint=1.5,
    basis="measured: a test's figures",
)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _estimate(tmp_path, tiny_registry, cache_dir, train, validation=None, **hyperparameters):
    spec = parse_spec(
        {
            "model": "tiny-llama",
            "validation_split": 0.0,
            "hyperparameters": {
                "n_epochs": 2,
                "batch_size": 2,
                "max_seq_length": 64,
                "eval_every_steps": 4,
                "checkpoint_every_steps": 5,
            }
            | hyperparameters,
        }
    )
    data = DataPaths(
        _write(tmp_path / "train.jsonl", train),
        _write(tmp_path / "validation.jsonl", validation) if validation else None,
    )
    return estimate_job(spec, data, registry=tiny_registry, cache_dir=cache_dir, throughput=FIGURES)


def test_each_phase_is_its_count_over_its_figure(tmp_path, tiny_registry, cache_dir):
    estimate = _estimate(tmp_path, tiny_registry, cache_dir, TRAIN, VALIDATION)
    # The validation file trained on: its tokens per epoch are its examples' tokens.
    as_train = _estimate(tmp_path / "v", tiny_registry, cache_dir, VALIDATION, n_epochs=1)
    mean_validation_tokens = as_train.train_tokens_per_epoch / len(VALIDATION)

    # 12 steps, evaluated every 4: at 4 and 8 on the whole set (no sample size yet), at the
    # last step (the final evaluation), and the base model before step 1.
    assert estimate.spec.hyperparameters.total_steps == 12
    assert estimate.evaluations == 4
    assert estimate.eval_tokens == math.ceil(4 * len(VALIDATION) * mean_validation_tokens)
    assert estimate.checkpoints == 2 + 1  # steps 5 and 10, then the output
    assert estimate.seconds_by_phase == {
        "load": 7.0,
        "train": estimate.trained_tokens / 200.0,
        "eval": estimate.eval_tokens / 500.0,
        "checkpoint": 3 * 1.5,
    }
    assert estimate.estimated_seconds == sum(estimate.seconds_by_phase.values())

    shown = estimate.as_dict()
    assert list(shown["seconds_by_phase"]) == list(PHASES)
    assert shown["basis"] == "measured: a test's figures"
    assert shown["evaluations"] == 4 and shown["checkpoints"] == 3
    assert shown["estimated_seconds"] == round(estimate.estimated_seconds, 1)


def test_without_validation_data_nothing_is_evaluated(tmp_path, tiny_registry, cache_dir):
    estimate = _estimate(tmp_path, tiny_registry, cache_dir, TRAIN)

    assert estimate.evaluations == 0 and estimate.eval_tokens == 0
    assert estimate.seconds_by_phase["eval"] == 0.0
    assert estimate.seconds_by_phase["train"] > 0 and estimate.seconds_by_phase["load"] == 7.0


def _hp(
    total_steps: int,
    eval_every_steps: int | None,
    eval_sample_size: int | None = None,
    final_eval_whole_set: bool = True,
):
    return SimpleNamespace(
        total_steps=total_steps,
        eval_every_steps=eval_every_steps,
        eval_sample_size=eval_sample_size,
        final_eval_whole_set=final_eval_whole_set,
    )


@pytest.mark.parametrize(
    ("total_steps", "every", "sample", "periodic", "whole", "examples"),
    [
        (24, 2, None, 13, 0, 13 * 191),  # the Dolly job, whole set each time
        (24, 2, 32, 13, 1, 13 * 32 + 191),  # a sample, then the kept weights on the whole set
        (25, 5, 32, 6, 1, 6 * 32 + 191),  # step 0, 5..25
        (26, 5, 32, 7, 1, 7 * 32 + 191),  # step 0, 5..25, and the last at 26
        (3, 10, 32, 2, 1, 2 * 32 + 191),  # the base model and the last step only
        (24, 2, 500, 13, 0, 13 * 191),  # a sample larger than the set is the set
    ],
)
def test_evaluations_follow_the_cadence_and_the_sample_size(
    total_steps, every, sample, periodic, whole, examples
):
    plan = evaluation_plan(_hp(total_steps, every, sample), n_validation=191)

    assert plan.periodic == periodic and plan.whole == whole
    assert plan.evaluations == periodic + whole
    assert plan.examples == examples


def test_a_sample_without_room_for_a_whole_set_pass_has_no_final_evaluation():
    plan = evaluation_plan(_hp(24, 12, 32, final_eval_whole_set=False), n_validation=191)

    assert (plan.periodic, plan.whole, plan.examples) == (3, 0, 3 * 32)


def test_no_cadence_or_no_validation_set_means_no_evaluation():
    assert evaluation_plan(_hp(24, None), n_validation=191).evaluations == 0
    assert evaluation_plan(_hp(24, 2), n_validation=0).examples == 0


@pytest.mark.parametrize(
    ("total_steps", "every", "writes"),
    [(20, 5, 3 + 1), (21, 5, 4 + 1), (4, 5, 0 + 1), (1, 1, 0 + 1)],
)
def test_checkpoints_before_the_last_step_and_the_output(total_steps, every, writes):
    hp = SimpleNamespace(total_steps=total_steps, checkpoint_every_steps=every)

    assert checkpoint_writes(hp) == writes


def test_an_unmeasured_eval_speed_is_a_forward_pass_share_of_the_train_speed():
    figures = Throughput.of(90.0, load_seconds=1.0, seconds_per_checkpoint=2.0, basis="x")

    assert figures.eval_tokens_per_second == pytest.approx(270.0)
    measured = Throughput.of(
        90.0, eval_tokens_per_second=400.0, load_seconds=1.0, seconds_per_checkpoint=2.0, basis="x"
    )
    assert measured.eval_tokens_per_second == 400.0
