"""The training loop on a tiny random Llama: outputs, resume, accumulation, early stopping."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from peft_engine import DataPaths, Hooks, train
from peft_engine.errors import TrainingDivergedError
from peft_engine.tasks.causal_lm import CausalLMTask
from tests.conftest import chat, logits_from_plain_peft, write_jsonl
from tests.engine_helpers import stop_after

ADAPTER_FILE = "adapter_model.safetensors"
QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(48)]


@pytest.fixture
def data(tmp_path):
    return DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))


def _spec(**hyperparameters):
    base = {"n_epochs": 2, "batch_size": 4, "learning_rate": 3e-3, "eval_every_steps": 4}
    return {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "hyperparameters": {**base, **hyperparameters},
    }


def _run(spec, workdir, data, tiny_registry, cache_dir, hooks=None, **kw):
    return train(spec, workdir, hooks, data=data, registry=tiny_registry, cache_dir=cache_dir, **kw)


def _train_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_output_is_complete_and_reports_the_run(tmp_path, data, tiny_registry, cache_dir):
    result = _run(_spec(), tmp_path / "run", data, tiny_registry, cache_dir)
    out = result.output_dir
    assert result.status == "succeeded" and out == tmp_path / "run" / "output"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "result.json",
        "README.md",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "result.json").read_text())
    assert report["spec"]["hyperparameters"]["n_epochs"] == 2
    assert report["spec"]["hyperparameters"]["total_steps"] == 18  # 36 examples / 4, twice
    assert set(report["metrics"]) == {"initial", "final", "best", "kept"}
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]
    assert report["best_step"] is not None
    assert report["trained_tokens"] > 0 and report["wall_seconds"] > 0
    assert report["truncated_examples"] == 0
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "PeftModel.from_pretrained" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == (
        "tiny-llama"
    )
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [
        "checkpoint-12",
        "checkpoint-16",
        "checkpoint-4",
        "checkpoint-8",
    ]


def test_output_loads_in_plain_peft_with_the_same_logits(
    tmp_path, data, tiny_registry, tiny_model_dir, cache_dir
):
    result = _run(_spec(), tmp_path / "run", data, tiny_registry, cache_dir)
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    model = result.model.eval()
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
    got = logits_from_plain_peft(tiny_model_dir, result.output_dir, input_ids, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), result.model.disable_adapter():  # the adapter must change something
        assert not torch.allclose(result.model(input_ids=input_ids).logits, expected)


@pytest.mark.parametrize("packing", [True, False])
def test_resume_continues_exactly(tmp_path, data, tiny_registry, cache_dir, packing):
    spec = _spec(packing=packing, checkpoint_every_steps=3)
    whole = _run(spec, tmp_path / "whole", data, tiny_registry, cache_dir)

    stopped = _run(spec, tmp_path / "split", data, tiny_registry, cache_dir, stop_after(7))
    assert stopped.status == "stopped" and stopped.output_dir is None
    # the stop kept step 7 as a checkpoint; resuming from the older one must also be exact
    assert (tmp_path / "split" / "checkpoints" / "checkpoint-7" / "trainer_state.json").is_file()
    resumed = _run(
        spec,
        tmp_path / "split",
        data,
        tiny_registry,
        cache_dir,
        resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-6",
    )

    expected, got = _train_losses(tmp_path / "whole"), _train_losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) == list(range(1, 19))  # step 7 was rewritten
    for step in range(1, 19):  # steps 1-6: same seed, same run; 7-18: resumed
        assert abs(got[step] - expected[step]) <= 1e-5, step
    assert resumed.result["best_step"] == whole.result["best_step"]
    assert resumed.result["trained_tokens"] == whole.result["trained_tokens"]
    assert (
        abs(
            resumed.result["metrics"]["final"]["eval_loss"]
            - whole.result["metrics"]["final"]["eval_loss"]
        )
        <= 1e-5
    )
    assert resumed.result["metrics"]["initial"] == whole.result["metrics"]["initial"]
    # the per-example losses went through the checkpoint too: the same diagnostics
    expected_rows, got_rows = (
        [json.loads(row) for row in (out / "diagnostics.jsonl").read_text().splitlines()]
        for out in (whole.output_dir, resumed.output_dir)
    )
    assert [(r["kind"], r["line"]) for r in got_rows] == [
        (r["kind"], r["line"]) for r in expected_rows
    ]
    assert any(r["kind"] == "hardest_training" and r["passes"] == 2 for r in got_rows)
    for got_row, expected_row in zip(got_rows, expected_rows, strict=True):
        assert got_row["loss"] == pytest.approx(expected_row["loss"], abs=1e-5)


def test_resume_refuses_a_checkpoint_of_another_job(tmp_path, data, tiny_registry, cache_dir):
    from peft_engine.errors import SpecError

    _run(
        _spec(max_steps=3, checkpoint_every_steps=2), tmp_path / "a", data, tiny_registry, cache_dir
    )
    with pytest.raises(SpecError, match="other settings or data"):
        _run(
            _spec(learning_rate=1e-4, max_steps=3),
            tmp_path / "b",
            data,
            tiny_registry,
            cache_dir,
            resume_from=tmp_path / "a" / "checkpoints" / "checkpoint-2",
        )


def test_accumulation_is_normalised_by_loss_tokens(tmp_path, data, tiny_registry, cache_dir):
    """One step of batch 8 equals one step of 4 x 2 accumulated: the same mean over tokens."""
    no_dropout = {"type": "lora", "dropout": 0.0}  # dropout masks depend on batch shapes
    one = _run(
        {**_spec(batch_size=8, max_steps=1), "method": no_dropout},
        tmp_path / "one",
        data,
        tiny_registry,
        cache_dir,
    )
    two = _run(
        {**_spec(batch_size=4, gradient_accumulation_steps=2, max_steps=1), "method": no_dropout},
        tmp_path / "two",
        data,
        tiny_registry,
        cache_dir,
    )
    assert _train_losses(tmp_path / "one")[1] == pytest.approx(
        _train_losses(tmp_path / "two")[1], abs=1e-6
    )
    weights_one = load_file(one.output_dir / "adapter_model.safetensors")
    weights_two = load_file(two.output_dir / "adapter_model.safetensors")
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, atol=1e-6, rtol=1e-5)


def test_early_stopping_keeps_the_best_step(tmp_path, data, tiny_registry, cache_dir):
    # A learning rate this high makes eval loss climb after the first evaluations.
    spec = _spec(
        learning_rate=0.08,
        lr_scheduler="constant",
        eval_every_steps=1,
        n_epochs=3,
        early_stopping={"patience": 2, "min_delta": 0.0},
    )
    events = []
    result = _run(
        spec, tmp_path / "run", data, tiny_registry, cache_dir, Hooks(on_event=events.append)
    )
    report = result.result
    assert report["early_stopped"] is True
    assert report["steps"] == report["best_step"] + 2 < report["total_steps"]  # patience 2
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["final"]["eval_loss"]
    assert any("early stopping" in e.message for e in events)
    # The output holds the best step's weights, not the last step's.
    best = tmp_path / "run" / "checkpoints" / f"checkpoint-{report['best_step']}"
    kept = load_file(result.output_dir / "adapter_model.safetensors")
    for name, value in load_file(best / "adapter_model.safetensors").items():
        torch.testing.assert_close(kept[name], value, atol=0, rtol=0)


def test_events_metrics_and_checkpoint_hooks_are_called(tmp_path, data, tiny_registry, cache_dir):
    metrics, checkpoints, events = [], [], []
    hooks = Hooks(
        on_event=events.append,
        on_metrics=lambda s, m: metrics.append((s, m)),
        on_checkpoint=lambda p, s, m: checkpoints.append((p, s, m)),
    )
    _run(_spec(max_steps=8), tmp_path / "run", data, tiny_registry, cache_dir, hooks)
    train_steps = [s for s, m in metrics if "train_loss" in m]
    assert train_steps == list(range(1, 9))
    step_metrics = next(m for s, m in metrics if "train_loss" in m)
    assert {
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "eta_seconds",
        "epoch",
        "total_steps",
    } <= set(step_metrics)
    assert [s for s, m in metrics if "eval_loss" in m] == [0, 4, 8]
    assert [s for _, s, _ in checkpoints] == [4]  # none after the last step: the output is
    assert (checkpoints[0][0] / "adapter_model.safetensors").is_file()
    assert "eval_loss" in checkpoints[0][2]
    assert any("eval (base model)" in e.message for e in events)


def test_a_loss_that_diverges_stops_the_run_before_the_weights_take_it(
    tmp_path, data, tiny_registry, cache_dir, monkeypatch
):
    # The forward pass of the third step overflows (as fp16 activations or a learning rate
    # far too high do): the run stops with the user's error before the optimizer applies
    # the step, so the weights and every checkpoint stay finite.
    calls = {"n": 0}
    real_loss = CausalLMTask.loss

    def overflowing(self, model, batch, job):
        result = real_loss(self, model, batch, job)
        calls["n"] += 1
        if calls["n"] > 2 and model.training:
            result.loss = result.loss * float("inf")
        return result

    monkeypatch.setattr(CausalLMTask, "loss", overflowing)
    metrics, checkpoints = [], []
    hooks = Hooks(
        on_metrics=lambda s, m: metrics.append((s, m)),
        on_checkpoint=lambda p, s, m: checkpoints.append(
            load_file(p / "adapter_model.safetensors")
        ),
    )
    spec = _spec(max_steps=8, eval_every_steps=1000, checkpoint_every_steps=1)
    spec["validation_split"] = 0.0
    with pytest.raises(TrainingDivergedError) as raised:
        _run(spec, tmp_path / "run", data, tiny_registry, cache_dir, hooks)
    assert raised.value.code == "training_diverged"
    assert raised.value.param == "hyperparameters.learning_rate"
    assert "at step 3" in str(raised.value)
    assert [s for s, m in metrics if "train_loss" in m] == [1, 2]
    assert len(checkpoints) == 2
    assert all(torch.isfinite(t).all() for c in checkpoints for t in c.values())
