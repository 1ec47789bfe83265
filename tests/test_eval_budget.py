"""Evaluation within a budget: the plan, the fixed validation sample, and what a job records."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from peft_engine import DataPaths, train
from peft_engine.eval_plan import EVAL_COST_PER_TOKEN, periodic_evaluations, plan_evaluation
from peft_engine.evaluation import evaluate, sample_indices
from peft_engine.prepare import prepare_job
from peft_engine.spec import DatasetStats, ModelLimits, parse_spec, resolve_spec
from peft_engine.tasks import task_for
from tests.conftest import chat, write_jsonl
from tests.engine_helpers import stop_after

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
        # the base model's, the periodic ones, and a sample's final pass over the whole set
        final = n_validation if plan.sample_size and plan.final_whole_set else 0
        cost = ((evaluations + 1) * size + final) * mean_tokens * EVAL_COST_PER_TOKEN
        at_the_floor = size == min(n_validation, 32) and evaluations <= 2 and not final
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
    # a pass over the 191 alone would cost more than the budget: the sample's numbers stand
    assert not plan.final_whole_set


def test_a_sample_leaves_room_for_the_kept_weights_pass_over_the_whole_set():
    # 600 examples' evaluation affordable: the 191 once at the end, 6 x 68 before
    plan = plan_evaluation(
        total_steps=100,
        train_tokens=100 * 4000,
        n_validation=191,
        validation_mean_tokens=300,
        eval_budget=0.15,
        explicit_every=None,
    )
    assert plan.every_steps == 20 and plan.sample_size == 68 and plan.final_whole_set


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


@pytest.mark.parametrize(
    ("budget", "max_steps", "final"),
    [
        (0.01, 12, False),  # a pass over the 50 alone goes over the budget: the sample's numbers
        (0.4, 36, True),  # room for the kept weights' pass over the whole set at the end
    ],
)
def test_a_sampled_job_records_its_timings_and_which_numbers_are_the_whole_sets(
    tmp_path, data, tiny_registry, cache_dir, budget, max_steps, final
):
    spec = _spec(eval_budget=budget, max_steps=max_steps)
    result = _run(spec, tmp_path / "run", data, tiny_registry, cache_dir)
    report = result.result
    hp = report["spec"]["hyperparameters"]
    size, every = hp["eval_sample_size"], hp["eval_every_steps"]
    assert size is not None and size >= 32 and hp["final_eval_whole_set"] is final
    periodic = [r["step"] for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert periodic == [*range(0, max_steps, every), max_steps]
    assert report["evaluation"] == {
        "validation_examples": 50,
        "periodic_sample_size": size,
        "eval_every_steps": every,
        "evaluations": len(periodic),
        "final": "whole set on the kept weights"
        if final
        else "the periodic sample (a whole-set pass would go over eval_budget)",
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
    assert timings["evaluations"] == len(periodic) + final  # + the kept weights' whole pass
    assert timings["checkpoints"] == (max_steps - 1) // every  # after the last, the output
    assert timings["train_tokens"] == report["trained_tokens"]
    job = prepare_job(parse_spec(spec), data, registry=tiny_registry, cache_dir=cache_dir)
    examples = job.validation.examples
    sample = [examples[i] for i in sample_indices(50, size, seed=42)]
    whole_tokens = sum(e.n_tokens for e in examples) if final else 0
    assert timings["eval_tokens"] == len(periodic) * sum(e.n_tokens for e in sample) + whole_tokens
    for name in ("load_seconds", "train_seconds", "eval_seconds", "wall_seconds"):
        assert timings[name] > 0, name
    card = (result.output_dir / "README.md").read_text()
    assert f"sample of {size} of the 50" in card
    assert ("kept, whole validation set" in card) is final

    # metrics.kept: the output's weights on the whole set (or the sample's numbers of the
    # kept step, when the budget has no room for it); best: on the sample
    task = task_for("causal_lm")
    whole, _, _ = evaluate(result.model, job, task, torch.device("cpu"))
    on_sample, _, _ = evaluate(result.model, job, task, torch.device("cpu"), sample)
    kept = whole if final else on_sample
    assert report["metrics"]["kept"]["eval_loss"] == pytest.approx(kept["eval_loss"], abs=1e-5)
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

    stopped = _run(spec, tmp_path / "split", data, tiny_registry, cache_dir, stop_after(9))
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
