"""The method catalogue, one parametrised table on a tiny random Llama (DESIGN §8).

For every method that supports causal LM: a short run lowers the loss, only the method's
own parameters change (the base model's stay bit-identical), the trainable share is what
the method promises, the saved adapter reloads with plain peft in a fresh process and gives
the engine's logits, and a resumed run continues exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_engine import DataPaths, Hooks, train
from peft_engine.methods import METHODS
from peft_engine.methods.weights import PEFT_ADAPTER, TRAINED_WEIGHTS_FILE
from tests.conftest import chat, logits_from_plain_peft, write_jsonl

QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(32)]
CAUSAL_METHODS = sorted(t for t, m in METHODS.items() if "causal_lm" in m.tasks)
# Small settings per method so the tiny model trains in seconds.
METHOD_SPECS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8},
    "loha": {"type": "loha", "r": 4, "alpha": 8},
    "lokr": {"type": "lokr", "r": 4, "alpha": 8},
    "ia3": {"type": "ia3"},
    "vera": {"type": "vera", "r": 16},
    "oft": {"type": "oft", "block_size": 8},
    "full": {"type": "full"},
}


# Options that change how a method trains or saves, each run through the same table.
VARIANTS = {
    "lora-dora": {"type": "lora", "r": 4, "alpha": 8, "use_dora": True},
    "lora-rslora-gaussian": {
        "type": "lora",
        "r": 4,
        "alpha": 8,
        "use_rslora": True,
        "init": "gaussian",
    },  # fmt: skip
}
CASES = {**METHOD_SPECS, **VARIANTS}
PEFT_CASES = sorted(k for k, v in CASES.items() if METHODS[v["type"]].weights is PEFT_ADAPTER)

LOAD_WITH_TUNEQ_LOADER = """
import sys, torch
from safetensors.torch import load_file, save_file
from peft_engine import load_trained
base_dir, output_dir, io = sys.argv[1:]
model = load_trained(output_dir, base_dir).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(io)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, io)
"""


def test_the_table_covers_every_causal_method():
    assert set(METHOD_SPECS) == set(CAUSAL_METHODS)


def _spec(method: str, **hyperparameters):
    return {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "method": CASES[method],
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 4,
            "eval_every_steps": 6,
            "checkpoint_every_steps": 6,
            "early_stopping": None,
        }
        | hyperparameters,
    }


@pytest.fixture
def data(tmp_path):
    return DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's own weights, under their plain names, whatever wraps them."""
    base = model.get_base_model()
    return {
        name.replace(".base_layer", ""): p.detach().clone()
        for name, p in base.named_parameters()
        if not p.requires_grad
    }


@pytest.mark.parametrize("method", PEFT_CASES)
def test_method_trains_only_its_parameters_and_reloads_in_plain_peft(
    method, tmp_path, data, tiny_registry, cache_dir, tiny_model_dir
):
    from transformers import AutoModelForCausalLM

    original = {
        n: p.detach().clone()
        for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()
    }
    result = train(
        _spec(method), tmp_path / "run", data=data, registry=tiny_registry, cache_dir=cache_dir
    )
    assert result.status == "succeeded"
    report = json.loads((result.output_dir / "result.json").read_text())
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]

    model = result.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert 0 < trainable < 0.2 * total, (trainable, total)
    # frozen base weights are bit-identical to the pretrained ones
    frozen = _base_weights(model)
    unchanged = [n for n, w in frozen.items() if n in original and torch.equal(w, original[n])]
    assert len(unchanged) == len(original), set(original) - set(unchanged)

    saved = load_file(result.output_dir / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) >= trainable  # VeRA also saves its projections

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    reloaded = logits_from_plain_peft(tiny_model_dir, result.output_dir, ids, scratch)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(input_ids=ids).logits, expected)


def test_full_fine_tuning_trains_everything_and_reloads_with_the_tuneq_loader(
    tmp_path, data, tiny_registry, cache_dir, tiny_model_dir
):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    spec = _spec("full", learning_rate=1e-3)
    result = train(spec, tmp_path / "run", data=data, registry=tiny_registry, cache_dir=cache_dir)
    assert result.status == "succeeded"
    out = result.output_dir
    report = json.loads((out / "result.json").read_text())
    assert report["metrics"]["best"]["eval_loss"] < report["metrics"]["initial"]["eval_loss"]
    assert not (out / "adapter_config.json").exists() and (out / TRAINED_WEIGHTS_FILE).is_file()
    assert "load_trained" in (out / "README.md").read_text()  # the card says how to load it

    model = result.model.eval()
    assert all(p.requires_grad for p in model.parameters())
    saved = load_file(out / TRAINED_WEIGHTS_FILE)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, saved[n])]
    assert len(changed) == len(saved)  # every trained tensor moved

    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    io = tmp_path / "io.safetensors"
    save_file({"input_ids": ids}, io)
    subprocess.run(
        [sys.executable, "-c", LOAD_WITH_TUNEQ_LOADER, str(tiny_model_dir), str(out), str(io)],
        check=True,
    )
    torch.testing.assert_close(load_file(io)["logits"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_resumes_exactly(method, tmp_path, data, tiny_registry, cache_dir):
    def run(workdir, hooks=None, **kw):
        return train(
            _spec(method),
            workdir,
            hooks,
            data=data,
            registry=tiny_registry,
            cache_dir=cache_dir,
            **kw,
        )

    whole = run(tmp_path / "whole")
    steps: list[int] = []
    stop_after_8 = Hooks(
        on_metrics=lambda step, m: steps.append(step) if "train_loss" in m else None,
        should_stop=lambda: len(steps) >= 8,
    )
    assert run(tmp_path / "split", stop_after_8).status == "stopped"
    resumed = run(tmp_path / "split", resume_from=tmp_path / "split/checkpoints/checkpoint-6")

    def losses(workdir):
        rows = (workdir / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["train_loss"] for r in map(json.loads, rows) if "train_loss" in r}

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(got) == sorted(expected)
    for step in expected:
        assert abs(got[step] - expected[step]) <= 1e-5, (method, step)
    assert resumed.result["trained_tokens"] == whole.result["trained_tokens"]
