"""Preference tuning (DPO) on the tiny Llama: the preference format, the objective in the
spec, the loss against an independent computation, the reference being the base model with
the adapter disabled, and an exact resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_engine import DataPaths, train
from peft_engine.data.formats import DataFormat, Example, read_examples
from peft_engine.data.tokenize import IGNORE
from peft_engine.errors import DataError, SpecError
from peft_engine.estimate import Throughput, estimate_job
from peft_engine.eval_plan import EVAL_COST_PER_TOKEN
from peft_engine.methods import METHODS, method_for
from peft_engine.methods.common import DpoObjective
from peft_engine.methods.lora import LoraMethod
from peft_engine.prepare import check_format, prepare_job
from peft_engine.spec import DatasetStats, ModelLimits, parse_spec, resolve_spec
from peft_engine.tasks import task_of
from peft_engine.tasks.preference import PREFERENCE, sequence_log_probs, tokenize_pairs
from tests.conftest import chat, write_jsonl
from tests.engine_helpers import randomise_lora_b, stop_after
from tests.preference_helpers import PAIRS, preference

DPO = {"type": "dpo", "beta": 0.1}
# Small settings for the tiny Llama (hidden size 32).
METHOD_OPTIONS = {
    "adalora": {"init_r": 6, "target_r": 2},
    "oft": {"block_size": 8},
    "vera": {"r": 16},
}

# ---------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------


def test_openais_preference_lines_are_read_as_pairs(tmp_path):
    row = preference("Hi?", "Hello!", "Go away.")
    row["input"]["tools"] = []  # OpenAI's other members of `input` are allowed
    row["input"]["messages"].insert(0, {"role": "system", "content": "Be kind."})

    examples = read_examples(write_jsonl(tmp_path / "p.jsonl", [row, PAIRS[0]]))

    assert [(e.line, e.format) for e in examples] == [
        (1, DataFormat.PREFERENCE),
        (2, DataFormat.PREFERENCE),
    ]


def _with(**changes):
    row = json.loads(json.dumps(PAIRS[0]))
    for path, value in changes.items():
        *parents, name = path.split("__")
        target = row
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is ...:
            del target[name]
        elif name.isdigit():
            target[int(name)] = value
        else:
            target[name] = value
    return row


ANSWER = {"role": "assistant", "content": "4."}


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        (_with(input=...), "input", "missing"),
        (_with(input="hi"), "input", "expected an object, found a string"),
        (_with(input__messages=...), "input.messages", "missing"),
        (_with(input__messages=[]), "input.messages", "the conversation is empty"),
        (
            _with(input__messages__0__role="robot"),
            "input.messages[0].role",
            "'robot' is not one of",
        ),
        (_with(input__messages__0__weight=1), "input.messages[0]", "weights apply to chat"),
        (_with(preferred_output=...), "preferred_output", "missing"),
        (_with(non_preferred_output=ANSWER), "non_preferred_output", "expected a list"),
        (
            _with(preferred_output=[ANSWER, ANSWER]),
            "preferred_output",
            "expected one assistant message, found 2",
        ),
        (
            _with(preferred_output__0__role="user"),
            "preferred_output[0].role",
            "must be 'assistant'",
        ),
        (_with(non_preferred_output__0__content=" "), "non_preferred_output[0].content", "empty"),
        (
            _with(non_preferred_output=PAIRS[0]["preferred_output"]),
            "non_preferred_output[0]",
            "nothing to prefer",
        ),
    ],
)
def test_a_bad_preference_line_is_named_with_its_number_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "p.jsonl", [PAIRS[1], PAIRS[2], row])

    with pytest.raises(DataError) as refused:
        read_examples(path)

    (error,) = refused.value.errors
    assert (error.line, error.field) == (3, field)
    assert message in error.message


def test_pairs_carry_loss_on_each_answer_only(tiny_tokenizer):
    examples = [Example(1, DataFormat.PREFERENCE, PAIRS[3])]

    (pair,) = tokenize_pairs(examples, tiny_tokenizer, max_seq_length=128, param="f").examples

    def trained(answer):
        ids = [t for t in answer.targets if t != IGNORE]
        return tiny_tokenizer.decode(ids)

    assert trained(pair.chosen) == "3 plus 3 is 6.<|im_end|>"
    assert trained(pair.rejected) == "I do not know.<|im_end|>"
    assert "user\nWhat is 3 plus 3?" in tiny_tokenizer.decode(pair.rejected.input_ids)
    assert pair.n_loss_tokens == 1  # the loss is a mean over pairs


def test_pairs_cut_to_nothing_are_left_out_and_none_left_is_refused(tiny_tokenizer):
    examples = [Example(i + 1, DataFormat.PREFERENCE, r) for i, r in enumerate(PAIRS[:2])]
    prompt_length = len(tiny_tokenizer.apply_chat_template(PAIRS[0]["input"]["messages"]))

    with pytest.raises(DataError, match="no pair has an answer to learn from"):
        tokenize_pairs(examples, tiny_tokenizer, max_seq_length=prompt_length, param="f")


# Two pairs whose answers run past 64 tokens: each answer is cut on its own.
LONG_PAIRS = [
    preference(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}. " * 12, "I do not know. " * 9)
    for i in (2, 3)
]


@pytest.mark.parametrize("max_seq_length", ["auto", 64])
def test_the_estimate_counts_a_pair_as_its_two_answers_after_the_prompt_as_trained(
    tmp_path, tiny_registry, cache_dir, max_seq_length
):
    spec = parse_spec(
        _spec(validation_split=0.0, hyperparameters={"max_seq_length": max_seq_length})
    )
    data = DataPaths(write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:6] + LONG_PAIRS))
    figures = Throughput.of(100.0, load_seconds=0.0, seconds_per_checkpoint=0.0, basis="test")

    estimate = estimate_job(
        spec, data, registry=tiny_registry, cache_dir=cache_dir, throughput=figures
    )
    job = prepare_job(spec, data, registry=tiny_registry, cache_dir=cache_dir)

    # "auto" fits the longest answer, not a pair's two; the batch size and the tokens trained
    # are the engine's
    assert estimate.spec.hyperparameters == job.spec.hyperparameters
    assert estimate.train_tokens_per_epoch == job.train.n_tokens
    assert estimate.truncated == job.train.truncated == (2 if max_seq_length == 64 else 0)
    # each step also runs the reference (the adapter disabled) forward over both answers
    assert estimate.seconds_by_phase["train"] == pytest.approx(
        estimate.trained_tokens * (1 + EVAL_COST_PER_TOKEN) / 100.0
    )


# ---------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------


def _spec(method: dict | None = None, **changes) -> dict:
    return {"model": "tiny-llama", "method": method or {"type": "lora", "objective": DPO}} | changes


@pytest.mark.parametrize(
    ("spec", "param", "message"),
    [
        (_spec({"objective": {"type": "dpo", "beta": 0}}), "method.objective.beta", "greater"),
        (_spec({"objective": {"type": "ppo"}}), "method.objective", "unknown objective 'ppo'"),
        (_spec({"objective": {"beta": 0.1}}), "method.objective", '{"type": "dpo"'),
        (_spec({"objective": {"type": "sft", "beta": 0.1}}), "method.objective.beta", "unknown"),
        (
            _spec({"objective": {"type": "dpo", "label_smoothing": 0.5}}),
            "method.objective.label_smoothing",
            "less than 0.5",
        ),
        (_spec({"type": "full", "objective": DPO}), "method.type", "no adapter to disable"),
        (_spec({"type": "prefix_tuning", "objective": DPO}), "method.type", "no adapter"),
        (_spec({"type": "bottleneck_adapter", "objective": DPO}), "method.type", "no adapter"),
        (_spec({"type": "lora", "init": "pissa", "objective": DPO}), "method.init", "base"),
        (_spec(task="token_classification"), "method.objective", "causal_lm only"),
        (_spec(hyperparameters={"packing": True}), "hyperparameters.packing", "packed"),
    ],
)
def test_a_dpo_spec_that_cannot_run_is_refused_naming_its_field(spec, param, message):
    with pytest.raises(SpecError) as refused:
        parse_spec(spec)

    assert refused.value.param == param
    assert message in str(refused.value)


def test_an_auto_batch_size_fits_both_answers_of_each_pair_in_the_token_budget():
    stats = DatasetStats(n_train=20_000, n_validation=0, max_tokens=1024, mean_tokens=300.0)
    limits = ModelLimits(max_position_embeddings=2048, max_tokens_per_batch=16_384)

    sft = resolve_spec(
        parse_spec({"model": "m", "hyperparameters": {"packing": False}}), stats, limits
    )
    dpo = resolve_spec(parse_spec(_spec()), stats, limits)

    assert sft.hyperparameters.batch_size == 16  # rows of up to 1024 tokens
    assert dpo.hyperparameters.batch_size == 8  # a pair is two rows of up to 1024, unpacked


def test_dpo_defaults_and_packing_resolved_off():
    spec = parse_spec(_spec({"type": "ia3", "objective": {"type": "dpo"}}))
    stats = DatasetStats(n_train=64, n_validation=8, max_tokens=100, mean_tokens=80.0)

    resolved = resolve_spec(spec, stats, ModelLimits(max_position_embeddings=512))

    assert spec.method.objective == DpoObjective(beta=0.1, label_smoothing=0.0, sft_weight=0.0)
    assert resolved.hyperparameters.packing is False
    assert parse_spec({"model": "m"}).method.objective.type == "sft"
    assert task_of(spec) is PREFERENCE


@pytest.mark.parametrize(
    ("method", "rows", "message"),
    [
        ({"type": "lora"}, PAIRS[:2], 'set method.objective to {"type": "dpo"}'),
        ({"type": "lora", "objective": DPO}, [chat("a", "b")], "trains on preference data"),
    ],
)
def test_the_file_must_match_the_objective(method, rows, message):
    examples = [Example(i + 1, DataFormat.PREFERENCE if "input" in r else DataFormat.CHAT, r)
                for i, r in enumerate(rows)]  # fmt: skip

    with pytest.raises(DataError, match=message) as refused:
        check_format(parse_spec(_spec(method)), examples, "training_file")

    assert refused.value.param == "training_file"


# ---------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------


def _lora_model(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return method_for("lora").build(base, LoraMethod(r=4, alpha=8, dropout=0.0), "causal_lm")


def _job(objective):
    return SimpleNamespace(spec=SimpleNamespace(method=SimpleNamespace(objective=objective)),
                           pad_token_id=0)  # fmt: skip


def _answer_log_prob(model, answer):
    """log π(answer | prompt), one example unpadded, from the model's full logits."""
    logits = model(input_ids=torch.tensor([answer.input_ids])).logits[0].float()
    targets = torch.tensor(answer.targets)
    loss = targets != IGNORE
    picked = logits.log_softmax(-1)[loss].gather(1, targets[loss][:, None])
    return picked.sum(), int(loss.sum())


def test_the_dpo_loss_equals_the_papers_with_a_separate_copy_of_the_base(
    tiny_model_dir, tiny_tokenizer
):
    examples = [Example(i + 1, DataFormat.PREFERENCE, r) for i, r in enumerate(PAIRS[:3])]
    pairs = tokenize_pairs(examples, tiny_tokenizer, max_seq_length=128, param="f").examples
    objective = DpoObjective(beta=0.5, label_smoothing=0.1, sft_weight=0.3)
    model = _lora_model(tiny_model_dir)
    randomise_lora_b(model)  # the trained model differs from the base
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # a second copy

    got = PREFERENCE.loss(model, PREFERENCE.collate(pairs, _job(objective)), _job(objective))
    got.loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    expected = torch.zeros(())
    for pair in pairs:
        chosen, n_chosen = _answer_log_prob(model, pair.chosen)
        rejected, _ = _answer_log_prob(model, pair.rejected)
        with torch.no_grad():
            ref_chosen, _ = _answer_log_prob(reference, pair.chosen)
            ref_rejected, _ = _answer_log_prob(reference, pair.rejected)
        h = 0.5 * ((chosen - ref_chosen) - (rejected - ref_rejected))
        expected = expected - 0.9 * F.logsigmoid(h) - 0.1 * F.logsigmoid(-h)
        expected = expected + 0.3 * (-chosen / n_chosen)
    expected.backward()

    assert got.n_loss_tokens == 3
    assert float(got.loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-4)
    for name, grad in got_grads.items():
        param = dict(model.named_parameters())[name]
        assert torch.allclose(grad, param.grad, atol=1e-5), name


def test_the_reference_is_the_base_model_with_the_adapter_disabled(tiny_model_dir, tiny_tokenizer):
    batch = _batch(tiny_tokenizer, PAIRS[:4])
    model = _lora_model(tiny_model_dir)
    randomise_lora_b(model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    with torch.no_grad(), model.disable_adapter():
        disabled = sequence_log_probs(model, batch)
    with torch.no_grad():
        adapted = sequence_log_probs(model, batch)
        expected = sequence_log_probs(base, batch)

    assert torch.allclose(disabled, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)


def test_evaluations_compute_the_reference_once_a_batch(tiny_model_dir, tiny_tokenizer):
    examples = [Example(i + 1, DataFormat.PREFERENCE, r) for i, r in enumerate(PAIRS[:6])]
    pairs = tokenize_pairs(examples, tiny_tokenizer, max_seq_length=128, param="f").examples
    job = SimpleNamespace(spec=SimpleNamespace(method=SimpleNamespace(objective=DpoObjective())),
                          pad_token_id=0)  # fmt: skip
    model = _lora_model(tiny_model_dir)
    randomise_lora_b(model)
    disabled, enter = [], model.disable_adapter
    model.disable_adapter = lambda: disabled.append(1) or enter()

    def evaluate():
        batches = [PREFERENCE.collate(pairs[i : i + 4], job) for i in (0, 4)]
        return PREFERENCE.evaluate(model, batches, torch.device("cpu"), job)[0]

    first = evaluate()
    assert len(disabled) == 2  # once for each batch
    assert evaluate() == first and len(disabled) == 2
    with torch.no_grad():  # the trained model moves on: the reference does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(2.0)
    moved = evaluate()
    assert len(disabled) == 2 and moved != first
    fresh = _lora_model(tiny_model_dir)  # computed afresh, the reference is the same
    fresh.load_state_dict(model.state_dict())
    batches = [PREFERENCE.collate(pairs[i : i + 4], job) for i in (0, 4)]
    assert PREFERENCE.evaluate(fresh, batches, torch.device("cpu"), job)[0] == pytest.approx(moved)


def _train(tmp_path, tiny_registry, cache_dir, workdir, hooks=None, hp=None, dropout=0.05, **kw):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    spec = {
        "model": "tiny-llama",
        "method": {"type": "lora", "r": 4, "alpha": 8, "dropout": dropout, "objective": DPO},
        "validation_split": 0.25,
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "max_seq_length": 64,
            "eval_every_steps": 3,
            "checkpoint_every_steps": 2,
        }
        | (hp or {}),
    }
    return train(
        spec,
        tmp_path / workdir,
        hooks,
        data=DataPaths(data),
        registry=tiny_registry,
        cache_dir=cache_dir,
        **kw,
    )


def _metrics(workdir):
    """metrics.jsonl without the timings: step, losses, learning rate, eval metrics."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    timed = {"tokens_per_second", "eta_seconds"}
    return [{k: v for k, v in row.items() if k not in timed} for row in rows]


def _batch(tokenizer, rows):
    """The rows as one padded batch of answers (the chosen, then the rejected)."""
    examples = [Example(i + 1, DataFormat.PREFERENCE, r) for i, r in enumerate(rows)]
    pairs = tokenize_pairs(examples, tokenizer, max_seq_length=128, param="f").examples
    return PREFERENCE.collate(pairs, _job(DpoObjective())).sequences


@pytest.mark.slow
def test_dpo_trains_from_log_2_and_raises_the_held_out_margin_against_a_fixed_base(
    tmp_path, tiny_registry, cache_dir, tiny_model_dir, tiny_tokenizer
):
    result = _train(tmp_path, tiny_registry, cache_dir, "run")

    initial, final = result.result["metrics"]["initial"], result.result["metrics"]["final"]
    # LoRA's B starts at zero: the model is the base, every pair's loss log 2, no margin.
    assert initial["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert initial["eval_reward_margin"] == 0.0 and initial["eval_reward_accuracy"] == 0.0
    assert _metrics(tmp_path / "run")[1]["train_loss"] == pytest.approx(math.log(2), abs=1e-6)
    # Trained: the preferred answers gain on the held-out pairs, against the same base.
    assert final["eval_reward_margin"] > 0 and final["eval_reward_accuracy"] > 0.5
    assert final["eval_logps_margin"] > initial["eval_logps_margin"]
    assert final["eval_loss"] < initial["eval_loss"]
    assert "| eval_reward_margin | 0.0000 |" in (result.output_dir / "README.md").read_text()
    # and the reference is still the base model: the adapter disabled, not the trained model
    model, base = result.model, AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = _batch(tiny_tokenizer, PAIRS[:4])
    with torch.no_grad(), model.disable_adapter():
        assert torch.allclose(sequence_log_probs(model, batch), sequence_log_probs(base, batch))


@pytest.mark.slow
def test_dpo_resumes_exactly(tmp_path, tiny_registry, cache_dir):
    whole = _train(tmp_path, tiny_registry, cache_dir, "whole")
    assert _train(tmp_path, tiny_registry, cache_dir, "split", stop_after(4)).status == "stopped"
    checkpoint = tmp_path / "split/checkpoints/checkpoint-4"
    resumed = _train(tmp_path, tiny_registry, cache_dir, "split", resume_from=checkpoint)

    assert _metrics(tmp_path / "split") == _metrics(tmp_path / "whole")
    adapters = [load_file(run.output_dir / "adapter_model.safetensors") for run in (whole, resumed)]
    assert adapters[0].keys() == adapters[1].keys()
    for name in adapters[0]:
        assert torch.equal(adapters[0][name], adapters[1][name]), name


@pytest.mark.slow
def test_a_step_cut_into_one_pair_a_forward_pass_is_the_same_step(
    tmp_path, tiny_registry, cache_dir
):
    runs = {
        budget: _train(
            tmp_path, tiny_registry, cache_dir, str(budget), hp={"max_steps": 2},
            dropout=0.0, tokens_per_forward=budget,  # dropout draws differ with the cut
        )
        for budget in (10_000, 60)  # a step in one forward pass / a pair (~80 tokens) in each
    }  # fmt: skip

    whole, cut = (_metrics(tmp_path / str(budget)) for budget in runs)
    for a, b in zip(whole, cut, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], abs=1e-6), name
    adapters = [load_file(run.output_dir / "adapter_model.safetensors") for run in runs.values()]
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, atol=1e-6, rtol=1e-5)


ADAPTERS = sorted(m.type for m in METHODS.values() if m.disables_adapter)


@pytest.mark.parametrize("method_type", ADAPTERS)
def test_every_method_said_to_disable_its_adapter_runs_as_the_base_when_disabled(
    method_type, tiny_model_dir, tiny_tokenizer
):
    batch = _batch(tiny_tokenizer, PAIRS[:2])
    method = METHODS[method_type]
    options = METHOD_OPTIONS.get(method_type, {})
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = method.build(base, method.spec(**options), "causal_lm")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # trained away from any identity initialisation
                param.add_(torch.randn_like(param) * 0.1)
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    with torch.no_grad():
        with model.disable_adapter():
            disabled = sequence_log_probs(model, batch)
        adapted = sequence_log_probs(model, batch)
        expected = sequence_log_probs(untouched, batch)

    assert torch.allclose(disabled, expected, atol=1e-5)
    assert not torch.allclose(adapted, expected, atol=1e-3)
