"""The live ETA: what is left of the job, priced with the job's own measurements."""

from __future__ import annotations

import pytest

from peft_engine import DataPaths, Hooks, train
from peft_engine.checkpoint import Timings
from peft_engine.eta import Rates, RemainingWork, eta_seconds, remaining_work
from peft_engine.eval_plan import EVAL_COST_PER_TOKEN
from tests.conftest import chat, write_jsonl


def _work(step, **kw):
    args = {
        "total_steps": 24,
        "eval_every": 5,
        "checkpoint_every": 5,
        "eval_tokens_each": 100,
        "final_eval_tokens": 0,
    }
    return remaining_work(step=step, **(args | kw))


def test_remaining_evaluations_and_checkpoints_follow_the_cadence():
    # evaluations after steps 5, 10, 15, 20 and the last, 24; checkpoints at 5..20 only
    assert (_work(1).evaluations, _work(1).checkpoints, _work(1).steps) == (5, 4, 23)
    assert (_work(5).evaluations, _work(5).checkpoints) == (5, 4)  # step 5's are still due
    assert (_work(6).evaluations, _work(6).checkpoints) == (4, 3)
    assert (_work(21).evaluations, _work(21).checkpoints) == (1, 0)
    assert (_work(24).evaluations, _work(24).steps) == (1, 0)
    assert _work(20, total_steps=20).evaluations == 1  # the last step is a multiple
    none = _work(1, eval_every=None, final_eval_tokens=500)
    assert (none.evaluations, none.eval_tokens_each, none.final_eval_tokens) == (0, 0, 0)


RATES = Rates(
    seconds_per_step=2.0,
    seconds_per_train_token=0.01,
    seconds_per_eval_token=0.002,
    seconds_per_checkpoint=3.0,
)


def test_the_eta_is_larger_by_the_measured_cost_of_the_evaluations_left():
    def work(evaluations, final=0):
        return RemainingWork(
            steps=10,
            evaluations=evaluations,
            eval_tokens_each=1000,
            final_eval_tokens=final,
            checkpoints=2,
        )

    without = eta_seconds(work(0), RATES)
    assert without == pytest.approx(10 * 2.0 + 2 * 3.0 + 3.0)  # steps, checkpoints, output
    assert eta_seconds(work(3), RATES) - without == pytest.approx(3 * 1000 * 0.002)
    assert eta_seconds(work(3, final=5000), RATES) - without == pytest.approx(8000 * 0.002)


def test_the_steps_left_are_priced_by_their_tokens_when_the_loop_knows_them():
    # a first step of short examples (0.01 s a token, 2 s a step) must not foretell short
    # steps: 10 steps of 500 tokens each are 50 s, not 10 x 2 s
    by_steps = RemainingWork(
        steps=10, evaluations=0, eval_tokens_each=0, final_eval_tokens=0, checkpoints=0
    )
    by_tokens = RemainingWork(
        steps=10,
        evaluations=0,
        eval_tokens_each=0,
        final_eval_tokens=0,
        checkpoints=0,
        train_tokens=5000,
    )
    assert eta_seconds(by_steps, RATES) == pytest.approx(10 * 2.0 + 3.0)
    assert eta_seconds(by_tokens, RATES) == pytest.approx(5000 * 0.01 + 3.0)
    assert (
        remaining_work(
            step=1,
            total_steps=4,
            eval_every=None,
            checkpoint_every=4,
            eval_tokens_each=0,
            final_eval_tokens=0,
            train_tokens=-3,  # rounding past the end: nothing left
        ).train_tokens
        == 0
    )


def test_unmeasured_evaluation_and_checkpoints_are_predicted_from_training():
    rates = Rates(seconds_per_step=2.0, seconds_per_train_token=0.01)
    work = RemainingWork(
        steps=0, evaluations=1, eval_tokens_each=300, final_eval_tokens=0, checkpoints=1
    )
    assert eta_seconds(work, rates) == pytest.approx(300 * 0.01 * EVAL_COST_PER_TOKEN + 2 * 2.0)


def test_rates_are_the_timings_averages():
    timings = Timings(
        train_seconds=10.0,
        eval_seconds=4.0,
        checkpoint_seconds=6.0,
        train_tokens=1000,
        eval_tokens=2000,
        checkpoints=3,
    )
    rates = Rates.measured(timings, steps=5)
    assert rates == Rates(2.0, 0.01, 0.002, 2.0)
    assert Rates.measured(Timings(train_seconds=1.0, train_tokens=10), steps=1) == Rates(
        1.0, 0.1, None, None
    )


QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(48)]


def test_a_real_jobs_eta_at_step_one_counts_the_evaluations_planned(
    tmp_path, tiny_registry, cache_dir
):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    spec = {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": 4,
            "eval_every_steps": 3,
            "checkpoint_every_steps": 100,
        },
    }
    first = {}
    hooks = Hooks(on_metrics=lambda step, m: first.setdefault(step, m) if step == 1 else None)
    result = train(spec, tmp_path / "run", hooks, data=data, registry=tiny_registry,
                   cache_dir=cache_dir)  # fmt: skip
    metrics = first[1]
    total = result.result["total_steps"]  # 9 steps: evaluations after 3, 6 and 9 are due
    step_seconds = metrics["trained_tokens"] / metrics["tokens_per_second"]
    # without evaluations the ETA would be the steps left and the output (no checkpoint
    # measured yet: one step's time each); the base model's evaluation priced the rest
    assert metrics["eta_seconds"] > (total - 1) * step_seconds + step_seconds
    assert result.result["timings"]["evaluations"] == 4
