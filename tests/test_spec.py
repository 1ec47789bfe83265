"""The job spec: strict validation, and "auto" values resolved from data and model limits."""

from __future__ import annotations

import pytest

from peft_engine.errors import SpecError
from peft_engine.spec import DatasetStats, ModelLimits, parse_spec, resolve_spec

LIMITS = ModelLimits(max_position_embeddings=8192)


def _stats(n_train=729, n_validation=81, max_tokens=900, mean_tokens=250.0):
    return DatasetStats(n_train, n_validation, max_tokens, mean_tokens)


def test_defaults_follow_the_design_example():
    spec = parse_spec({"model": "smollm2-135m-instruct"})
    hp = spec.hyperparameters
    assert spec.task == "causal_lm" and spec.method.type == "lora"
    assert (spec.method.r, spec.method.alpha, spec.method.target_modules) == (16, 32, "all-linear")
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == ("auto", "auto", "auto")
    assert hp.packing and not hp.train_on_inputs and hp.max_seq_length == 1024


def test_auto_values_are_resolved_from_the_data():
    resolved = resolve_spec(parse_spec({"model": "m"}), _stats(), LIMITS)
    hp = resolved.hyperparameters
    assert hp.n_epochs == 3
    assert hp.batch_size == 4  # 0.2% of 729 rounds to 2, and auto never goes below 4
    assert hp.learning_rate == 2e-4
    assert hp.steps_per_epoch == 183  # ceil(729 / 4)
    assert hp.total_steps == 549
    assert hp.warmup_steps == 16  # 3% of 549
    assert hp.eval_every_steps == 55 and hp.checkpoint_every_steps == 55  # 10 evaluations


@pytest.mark.parametrize(("n_train", "epochs"), [(10, 10), (30, 4), (100, 3), (20_000, 1)])
def test_auto_epochs_aim_for_a_useful_number_of_examples_seen(n_train, epochs):
    resolved = resolve_spec(parse_spec({"model": "m"}), _stats(n_train=n_train), LIMITS)
    assert resolved.hyperparameters.n_epochs == epochs


def test_auto_batch_size_respects_the_token_budget():
    limits = ModelLimits(max_position_embeddings=8192, max_tokens_per_batch=2048)
    stats = _stats(n_train=50_000, max_tokens=4000, mean_tokens=1000.0)
    assert resolve_spec(parse_spec({"model": "m"}), stats, limits).hyperparameters.batch_size == 2
    padded = parse_spec({"model": "m", "hyperparameters": {"packing": False}})
    # Padded batches cost the longest example (capped at max_seq_length) per row.
    assert resolve_spec(padded, stats, limits).hyperparameters.batch_size == 2


def test_auto_max_seq_length_fits_the_longest_example_within_the_model():
    spec = parse_spec({"model": "m", "hyperparameters": {"max_seq_length": "auto"}})
    assert resolve_spec(spec, _stats(max_tokens=300), LIMITS).hyperparameters.max_seq_length == 320
    small = ModelLimits(max_position_embeddings=256)
    assert resolve_spec(spec, _stats(max_tokens=300), small).hyperparameters.max_seq_length == 256


def test_default_max_seq_length_shrinks_to_the_model_but_an_explicit_one_is_refused():
    small = ModelLimits(max_position_embeddings=512)
    default = resolve_spec(parse_spec({"model": "m"}), _stats(), small)
    assert default.hyperparameters.max_seq_length == 512
    explicit = parse_spec({"model": "m", "hyperparameters": {"max_seq_length": 1024}})
    with pytest.raises(SpecError, match="exceeds the model's context of 512"):
        resolve_spec(explicit, _stats(), small)


def test_explicit_values_are_kept_and_max_steps_caps_the_run():
    spec = parse_spec(
        {
            "model": "m",
            "hyperparameters": {
                "n_epochs": 2,
                "batch_size": 8,
                "learning_rate": 1e-3,
                "gradient_accumulation_steps": 2,
                "max_steps": 10,
                "eval_every_steps": 5,
            },
        }
    )
    hp = resolve_spec(spec, _stats(n_train=100), LIMITS).hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate) == (2, 8, 1e-3)
    assert hp.steps_per_epoch == 7 and hp.total_steps == 10
    assert hp.eval_every_steps == 5 and hp.checkpoint_every_steps == 5


def test_a_batch_larger_than_the_data_is_refused():
    spec = parse_spec({"model": "m", "hyperparameters": {"batch_size": 64}})
    with pytest.raises(SpecError) as caught:
        resolve_spec(spec, _stats(n_train=10), LIMITS)
    assert caught.value.param == "hyperparameters.batch_size"


def test_no_validation_data_means_no_evaluation():
    hp = resolve_spec(parse_spec({"model": "m"}), _stats(n_validation=0), LIMITS).hyperparameters
    assert hp.eval_every_steps is None and hp.checkpoint_every_steps >= 1


@pytest.mark.parametrize(
    ("data", "param", "message"),
    [
        ({"model": "m", "epochs": 3}, "epochs", "unknown field"),
        ({"model": "m", "hyperparameters": {"seed": -1}}, "hyperparameters.seed", "greater than"),
        (
            {"model": "m", "hyperparameters": {"learning_rate": 5}},
            "hyperparameters.learning_rate",
            "less than or equal to 1",
        ),
        (
            {"model": "m", "hyperparameters": {"lr_scheduler": "step"}},
            "hyperparameters.lr_scheduler",
            "'constant' or 'reduce_on_plateau'",
        ),
        ({"model": "m", "validation_split": 0.9}, "validation_split", "less than or equal to 0.5"),
        ({"model": "m", "method": {"type": "qlora"}}, "method", "unknown method 'qlora'"),
        ({"model": "m", "method": "lora"}, "method", "must be an object"),
        ({"model": "m", "method": {"alpha": 0}}, "method.alpha", "greater than 0"),
        ({"model": "m", "task": "translation"}, "task", "'causal_lm'"),
        ({"model": "m", "suffix": "no spaces please"}, "suffix", "should match pattern"),
        (
            {"model": "m", "hyperparameters": {"early_stopping": {"patience": 0}}},
            "hyperparameters.early_stopping.patience",
            "greater than or equal to 1",
        ),
        ({}, "model", "Field required"),
        # peft would fail mid-training with no rank to re-allocate
        ({"model": "m", "method": {"type": "adalora", "init_r": 8}}, "method.target_r", "init_r"),
        (
            {"model": "m", "method": {"type": "adalora", "init_r": 4, "target_r": 6}},
            "method.target_r",
            "must be smaller than init_r (4)",
        ),
    ],
)
def test_bad_values_name_their_field(data, param, message):
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    assert caught.value.param == param
    assert message in caught.value.message


def test_resolved_spec_round_trips_through_json():
    resolved = resolve_spec(parse_spec({"model": "m"}), _stats(), LIMITS)
    again = type(resolved).model_validate_json(resolved.model_dump_json())
    assert again == resolved
