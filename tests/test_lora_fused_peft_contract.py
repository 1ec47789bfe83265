"""The fused LoRA path (peft_engine.methods.lora_fused) against the peft it relies on.

It reads peft's LoRA layer internals, so a peft that changes them must fail here, loudly:
every plain LoRA layer of a tiny Llama runs the fused function, a layer without the
internals is an error, and a call that falls back to peft's slower forward is counted (and
warned about when a training job should not meet it). The installed peft and transformers
are the ones pyproject.toml pins.
"""

from __future__ import annotations

import tomllib
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from transformers import LlamaConfig, LlamaForCausalLM

from peft_engine.methods.lora import LoraMethod, build_lora
from peft_engine.methods.lora_fused import FALLBACKS, PeftInternalsChanged, fuse_lora

LAYERS = 2
ADAPTED = 7 * LAYERS  # q, k, v, o, gate, up and down projections of each block
IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


def _llama(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).to(dtype)


def _lora_layers(model: torch.nn.Module) -> list[PeftLoraLinear]:
    return [m for m in model.modules() if isinstance(m, PeftLoraLinear)]


def _graph_nodes(output: torch.Tensor, name: str) -> int:
    """How many nodes of `output`'s autograd graph are a `name` backward."""
    seen, stack, count = set(), [output.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(parent for parent, _ in node.next_functions)
    return count


@pytest.fixture(autouse=True)
def _no_fallbacks_left() -> None:
    FALLBACKS.clear()
    yield
    FALLBACKS.clear()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_every_plain_lora_layer_runs_the_fused_function(dropout: float) -> None:
    model = build_lora(_llama(), LoraMethod(dropout=dropout), "causal_lm")
    layers = _lora_layers(model)
    assert len(layers) == ADAPTED
    assert all(hasattr(layer, "_peft_forward") for layer in layers)  # all fused at build
    model.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "fused LoRA")  # a fallback warning fails the test
        logits = model(input_ids=IDS).logits
    assert _graph_nodes(logits, "_LoraLinearBackward") == ADAPTED
    assert not FALLBACKS
    logits.sum().backward()
    assert all(layer.lora_A["default"].weight.grad is not None for layer in layers)


@pytest.mark.parametrize("attribute", ["scaling", "lora_variant", "lora_dropout"])
def test_a_lora_layer_without_what_the_fused_path_reads_is_an_error(
    attribute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"]))
    monkeypatch.delattr(_lora_layers(model)[0], attribute)
    with pytest.raises(PeftInternalsChanged, match=f"missing \\['{attribute}'\\]"):
        fuse_lora(model)


def test_a_lora_forward_of_another_signature_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"]))

    def forward(self, x, adapter_names=None):  # what a changed peft might have
        raise AssertionError("never called")

    monkeypatch.setattr(PeftLoraLinear, "forward", forward)
    with pytest.raises(PeftInternalsChanged, match="adapter_names"):
        fuse_lora(model)


def test_a_fallback_the_caller_chose_is_counted_without_a_warning() -> None:
    model = build_lora(_llama(), LoraMethod(dropout=0.0), "causal_lm").eval()
    with torch.no_grad(), model.disable_adapter(), warnings.catch_warnings():
        warnings.filterwarnings("error", "fused LoRA")
        model(input_ids=IDS)
    assert FALLBACKS == {"adapters disabled or merged": ADAPTED}


def test_a_fallback_a_job_should_not_meet_warns_once_and_is_counted() -> None:
    """A bfloat16 base (a GPU's dtype): peft keeps the adapters in float32, so no layer can
    take the fused path; that shows, once, instead of a silently slower job."""
    model = build_lora(_llama(torch.bfloat16), LoraMethod(dropout=0.0), "causal_lm")
    assert _lora_layers(model)[0].lora_A["default"].weight.dtype == torch.float32
    with pytest.warns(RuntimeWarning, match="dtypes differ") as caught:
        model(input_ids=IDS)
        model(input_ids=IDS)
    assert sum("fused LoRA" in str(w.message) for w in caught) == 1
    assert FALLBACKS == {"the input, base and adapter dtypes differ": 2 * ADAPTED}


@pytest.mark.parametrize("package", ["peft", "transformers"])
def test_the_installed_package_is_within_the_pins(package: str) -> None:
    """lora_fused relies on peft's internals and the models on transformers': the suite
    passes on what is installed, so that must be what pyproject.toml allows."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    (pin,) = [r for r in pins if r.name == package]
    assert pin.specifier.contains(version(package)), f"{package} {version(package)} not {pin}"
    assert any(s.operator == "<" for s in pin.specifier), f"{pin} has no upper bound"
