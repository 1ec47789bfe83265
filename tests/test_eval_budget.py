"""Evaluation within a budget: the plan, the fixed validation sample, and what a job records."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from peft_engine import DataPaths, Hooks, train
from peft_engine.evaluation import evaluate, sample_indices
from peft_engine.prepare import prepare_job
from peft_engine.spec import (
    EVAL_COST_PER_TOKEN,
    DatasetStats,
    ModelLimits,
    parse_spec,
    periodic_evaluations,
    plan_evaluation,
    resolve_spec,
)
from peft_engine.tasks import task_for
from tests.conftest import chat, write_jsonl

SHAPES = list(
    itertools.product(
        [1, 2, 3, 7, 24, 100, 549, 5000],  # total steps
        [1, 5, 31, 81, 191, 2000, 50_000],  # validation examples
        [20.0, 250.0, 2000.0],  # mean validation tokens
        [0.05, 0.15, 1.0],  # budget
    )
)


@pytest.mark.parametrize("train_tokens_per_step", [100.0, 4000.0])
def test_the_plan_keeps_periodic_evaluation_within_the_budget(train_tokens_per_step):
    for steps, n_validation, mean_tokens, budget in SHAPES:
        plan = plan_evaluation(
            total_steps=steps,
            train_tokens=steps * train_tokens_per_step,
            n_validation=n_validation,
            validation_mean_tokens=mean_tokens,
            eval_budget=budget,
            explicit_every=None,
        )
        shape = (steps, n_validation, mean_tokens, budget)
        size = plan.sample_size or n_validation
        evaluations = periodic_evaluations(steps, plan.every_steps)
        assert 1 <= plan.every_steps <= steps, shape
        assert min(2, steps) <= evaluations <= 10, shape
        assert plan.sample_size is None or plan.sample_size < n_validation, shape
        cost = (evaluations + 1) * size * mean_tokens * EVAL_COST_PER_TOKEN  # + the base model
        at_the_floor = size == min(n_validation, 32) and evaluations <= 2
        within = cost <= budget * steps * train_tokens_per_step * (1 + 1e-9)  # float rounding
        assert within or at_the_floor, shape


def test_a_cheap_validation_set_is_evaluated_whole_ten_times():
    plan = plan_evaluation(
        total_steps=500,
        train_tokens=500 * 4000,
        n_validation=50,
        validation_mean_tokens=200,
        eval_budget=0.15,
        explicit_every=None,
    )
    assert plan.every_steps == 50 and plan.sample_size is None


def test_the_issues_dolly_job_evaluates_a_sample_a_few_times():
    # 96 chats, batch 4, 24 steps; 191 validation chats of about the same length
    plan = plan_evaluation(
        total_steps=24,
        train_tokens=96 * 300,
        n_validation=191,
        validation_mean_tokens=300,
        eval_budget=0.15,
        explicit_every=None,
    )
    assert plan.sample_size == 32 and periodic_evaluations(24, plan.every_steps) == 2


def test_explicit_eval_every_steps_is_obeyed_on_the_whole_set():
    stats = DatasetStats(n_train=96, n_validation=5000, max_tokens=900, mean_tokens=300.0)
    spec = parse_spec({"model": "m", "hyperparameters": {"eval_every_steps": 2}})
    hp = resolve_spec(spec, stats, ModelLimits(8192)).hyperparameters
    assert hp.eval_every_steps == 2 and hp.eval_sample_size is None
    assert hp.checkpoint_every_steps == 2


def test_no_validation_data_means_no_evaluation():
    stats = DatasetStats(n_train=96, n_validation=0, max_tokens=900, mean_tokens=300.0)
    hp = resolve_spec(parse_spec({"model": "m"}), stats, ModelLimits(8192)).hyperparameters
    assert hp.eval_every_steps is None and hp.eval_sample_size is None


def test_eval_budget_is_bounded():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(Exception, match="eval_budget"):
            parse_spec({"model": "m", "hyperparameters": {"eval_budget": bad}})


def test_the_sample_is_seeded_nested_and_in_file_order():
    small, large = sample_indices(500, 32, seed=7), sample_indices(500, 100, seed=7)
    assert small == sample_indices(500, 32, seed=7)  # deterministic
    assert small == sorted(small) and len(set(small)) == 32 and max(small) < 500
    assert set(small) <= set(large)  # a larger sample holds the smaller one
    assert sample_indices(500, 32, seed=8) != small
    assert sample_indices(20, 32, seed=7) == list(range(20))
    assert sample_indices(20, None, seed=7) == list(range(20))


def test_the_sample_does_not_touch_the_global_generators():
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    sample_indices(500, 32, seed=7)
    assert torch.equal(torch.rand(1), before)


# A tiny job whose validation set (50 examples) is too costly for a tiny budget: the periodic
# evaluations use a sample of 32.
QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(200)]


@pytest.fixture
def data(tmp_path):
    return DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))


def _spec(**hyperparameters):
    hp = {"n_epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "max_steps": 12}
    return {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "hyperparameters": {**hp, "eval_budget": 0.01, **hyperparameters},
    }


def _run(spec, workdir, data, tiny_registry, cache_dir, hooks=None, **kw):
    return train(spec, workdir, hooks, data=data, registry=tiny_registry, cache_dir=cache_dir, **kw)


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_sampled_job_records_its_timings_and_the_kept_weights_whole_set_metrics(
    tmp_path, data, tiny_registry, cache_dir
):
    result = _run(_spec(), tmp_path / "run", data, tiny_registry, cache_dir)
    report = result.result
    hp = report["spec"]["hyperparameters"]
    assert hp["eval_sample_size"] == 32 and hp["eval_every_steps"] == 6
    periodic = [r for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in periodic] == [0, 6, 12]
    assert report["evaluation"] == {
        "validation_examples": 50,
        "periodic_sample_size": 32,
        "eval_every_steps": 6,
        "evaluations": 3,
        "final": "whole set on the kept weights",
    }

    timings = report["timings"]
    assert set(timings) == {
        "load_seconds",
        "train_seconds",
        "eval_seconds",
        "checkpoint_seconds",
        "wall_seconds",
        "train_tokens",
        "eval_tokens",
        "evaluations",
        "checkpoints",
    }
    assert timings["evaluations"] == 4  # three on the sample, one on the whole set
    assert timings["checkpoints"] == 1  # step 6; after step 12 the output is written
    assert timings["train_tokens"] == report["trained_tokens"]
    job = prepare_job(parse_spec(_spec()), data, registry=tiny_registry, cache_dir=cache_dir)
    examples = job.validation.examples
    sample = [examples[i] for i in sample_indices(50, 32, seed=42)]
    n_tokens = sum(e.n_tokens for e in sample)
    assert timings["eval_tokens"] == 3 * n_tokens + sum(e.n_tokens for e in examples)
    for name in ("load_seconds", "train_seconds", "eval_seconds", "wall_seconds"):
        assert timings[name] > 0, name
    card = (result.output_dir / "README.md").read_text()
    assert "kept, whole validation set" in card and "sample of 32 of the 50" in card

    # metrics.kept: the output's weights on the whole validation set; best: on the sample
    task = task_for("causal_lm")
    whole, _, _ = evaluate(result.model, job, task, torch.device("cpu"))
    on_sample, _, _ = evaluate(result.model, job, task, torch.device("cpu"), sample)
    assert report["metrics"]["kept"]["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-5)
    assert report["metrics"]["best"]["eval_loss"] == pytest.approx(on_sample["eval_loss"], abs=1e-5)


def test_an_unsampled_job_keeps_its_best_periodic_metrics(tmp_path, data, tiny_registry, cache_dir):
    result = _run(_spec(eval_every_steps=6), tmp_path / "run", data, tiny_registry, cache_dir)
    report = result.result
    assert report["spec"]["hyperparameters"]["eval_sample_size"] is None
    assert report["metrics"]["kept"] == report["metrics"]["best"]
    assert report["evaluation"]["final"] == "the periodic evaluations used the whole set"
    assert report["timings"]["evaluations"] == report["evaluation"]["evaluations"]


def test_resume_is_exact_with_a_sampled_evaluation(tmp_path, data, tiny_registry, cache_dir):
    spec = _spec(eval_budget=0.01, max_steps=None, n_epochs=1, checkpoint_every_steps=4)
    whole = _run(spec, tmp_path / "whole", data, tiny_registry, cache_dir)
    assert whole.result["spec"]["hyperparameters"]["eval_sample_size"] == 32

    steps_seen = []
    stop_after_9 = Hooks(
        on_metrics=lambda step, m: steps_seen.append(step) if "train_loss" in m else None,
        should_stop=lambda: len(steps_seen) >= 9,
    )
    stopped = _run(spec, tmp_path / "split", data, tiny_registry, cache_dir, stop_after_9)
    assert stopped.status == "stopped"
    resumed = _run(
        spec,
        tmp_path / "split",
        data,
        tiny_registry,
        cache_dir,
        resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-8",
    )
    expected, got = _rows(tmp_path / "whole"), _rows(tmp_path / "split")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, have in zip(expected, got, strict=True):
        for name in ("train_loss", "eval_loss"):
            if name in want:
                assert have[name] == pytest.approx(want[name], abs=1e-5), (want["step"], name)
    assert resumed.result["best_step"] == whole.result["best_step"]
    assert resumed.result["metrics"]["kept"]["eval_loss"] == pytest.approx(
        whole.result["metrics"]["kept"]["eval_loss"], abs=1e-5
    )
    # the counts carry across the resume: the same work as the whole run
    for name in ("train_tokens", "eval_tokens", "evaluations", "checkpoints"):
        assert resumed.result["timings"][name] == whole.result["timings"][name], name
