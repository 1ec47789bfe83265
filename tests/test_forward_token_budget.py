"""Splitting a step into forward passes of at most N tokens: the same step, and a resumed run
with splitting is still exact.

No test here looks at a clock: bench/train_throughput.py measures the speed.
"""

from __future__ import annotations

import json

import pytest
import torch

from peft_engine import DataPaths, Hooks, train
from peft_engine.data.steps import split_by_tokens
from tests.conftest import chat, write_jsonl
from tests.engine_helpers import tokenized_chat_examples


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return tokenized_chat_examples(tiny_tokenizer)


def test_split_by_tokens_keeps_order_and_whole_examples(examples):
    lengths = [len(e.input_ids) for e in examples]
    for budget in (1, min(lengths), sum(lengths[:2]), sum(lengths)):
        pieces = split_by_tokens(list(examples), budget)
        assert [e for piece in pieces for e in piece] == list(examples)
        for piece in pieces:
            assert len(piece) == 1 or sum(len(e.input_ids) for e in piece) <= budget
    assert len(split_by_tokens(list(examples), sum(lengths))) == 1


QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(32)]


def _spec(**hyperparameters):
    return {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "method": {"type": "lora", "dropout": 0.0},  # masks are drawn per forward pass
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "eval_every_steps": 3,
            **hyperparameters,
        },
    }


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_a_step_split_into_small_forward_passes_is_the_same_step(
    tmp_path, tiny_registry, cache_dir
):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    runs = {}
    for budget in (10_000, 40):  # one forward pass a step / several (each ~30 tokens)
        runs[budget] = train(
            _spec(max_steps=3),
            tmp_path / str(budget),
            data=data,
            registry=tiny_registry,
            cache_dir=cache_dir,
            tokens_per_forward=budget,
        )
    whole, split = _losses(tmp_path / "10000"), _losses(tmp_path / "40")
    for step in whole:
        assert split[step] == pytest.approx(whole[step], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(runs[10_000].output_dir / "adapter_model.safetensors")
    b = load_file(runs[40].output_dir / "adapter_model.safetensors")
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-6, rtol=1e-5)


def test_resume_is_exact_with_small_forward_passes_and_dropout(tmp_path, tiny_registry, cache_dir):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    spec = {**_spec(checkpoint_every_steps=2), "method": {"type": "lora", "dropout": 0.1}}
    kw = {"data": data, "registry": tiny_registry, "cache_dir": cache_dir, "tokens_per_forward": 40}
    train(spec, tmp_path / "whole", **kw)
    seen = []
    stop = Hooks(
        on_metrics=lambda step, m: seen.append(step) if "train_loss" in m else None,
        should_stop=lambda: len(seen) >= 3,
    )
    assert train(spec, tmp_path / "split", stop, **kw).status == "stopped"
    train(
        spec,
        tmp_path / "split",
        resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-2",
        **kw,
    )
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) and len(expected) == 6
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
