"""The dry run's memory estimate (peft_engine/memory.py) on the tiny Llama: parameter and
optimizer-state bytes are exact counts of what the engine builds and AdamW allocates; the
activations grow with the tokens of a forward pass and shrink with gradient checkpointing.
How close the whole estimate comes to measured peaks is bench/memory.py's business."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_engine import fused_loss
from peft_engine.estimate import Throughput, estimate_job
from peft_engine.memory import (
    CHUNK_ROWS,
    FUSED_MODEL_TYPES,
    GPU_TOKENS_PER_FORWARD,
    estimate_memory,
    forward_tokens,
    per_rank,
    read_model_shape,
)
from peft_engine.methods import method_for
from peft_engine.methods.full import FullMethod
from peft_engine.methods.lora import LoraMethod
from peft_engine.prepare import DataPaths
from peft_engine.spec import parse_spec
from peft_engine.training import default_tokens_per_forward
from tests.conftest import chat

LORAS = [
    LoraMethod(r=4, alpha=8),
    LoraMethod(r=8, target_modules=["q_proj", "v_proj"], dropout=0.0),
    LoraMethod(r=2, use_dora=True),
]


def _base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _trained(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_the_model_shape_counts_every_parameter(tiny_model_dir):
    shape = read_model_shape(tiny_model_dir)

    assert shape is not None
    assert shape.parameters == sum(p.numel() for p in _base(tiny_model_dir).parameters())
    assert (shape.hidden, shape.intermediate, shape.layers) == (32, 64, 2)
    assert (shape.heads, shape.kv_heads, shape.head_dim, shape.gated_mlp) == (4, 2, 8, True)
    assert read_model_shape(tiny_model_dir / "missing") is None


@pytest.mark.parametrize("method", [*LORAS, FullMethod()], ids=lambda m: m.type)
def test_trained_parameters_and_their_state_are_what_the_engine_and_adamw_hold(
    tiny_model_dir, method
):
    model = method_for(method.type).build(_base(tiny_model_dir), method, "causal_lm")
    trained = _trained(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # one AdamW step allocates the state: float32 exp_avg and exp_avg_sq per parameter
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    model(
        input_ids=torch.tensor([[1, 5, 9, 3]]), labels=torch.tensor([[1, 5, 9, 3]])
    ).loss.backward()
    optimizer.step()
    state = sum(
        tensor.numel() * tensor.element_size()
        for per_param in optimizer.state.values()
        for name, tensor in per_param.items()
        if name != "step"
    )
    held = sum(p.numel() * p.element_size() for p in trained)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trained)

    shape = read_model_shape(tiny_model_dir)
    estimate = estimate_memory(shape, method, tokens=64, precision="fp32", checkpointing=False)

    assert estimate.trained_parameters == sum(p.numel() for p in trained)
    assert estimate.trained_state_bytes == held + grads + state
    assert estimate.weights_bytes == sum(p.numel() * 4 for p in frozen)
    half = estimate_memory(shape, method, tokens=64, precision="bf16", checkpointing=False)
    # bf16: frozen weights in 2 bytes, and an autocast copy of each trained one
    assert half.weights_bytes == 2 * sum(p.numel() for p in model.parameters())
    assert half.trained_state_bytes == estimate.trained_state_bytes


@pytest.mark.parametrize("method", [LORAS[0], FullMethod()], ids=lambda m: m.type)
def test_activations_grow_with_tokens_and_shrink_with_checkpointing(tiny_model_dir, method):
    shape = read_model_shape(tiny_model_dir)

    def at(tokens: int, checkpointing: bool, precision: str = "fp32"):
        return estimate_memory(
            shape, method, tokens=tokens, precision=precision, checkpointing=checkpointing
        )

    for checkpointing in (False, True):
        sizes = [at(tokens, checkpointing).activations_bytes for tokens in (64, 512, 4096)]
        assert sizes == sorted(sizes) and len(set(sizes)) == 3
    for tokens in (64, 4096):
        on, off = at(tokens, True), at(tokens, False)
        assert on.activations_bytes < off.activations_bytes
        assert (on.weights_bytes, on.trained_state_bytes) == (
            off.weights_bytes,
            off.trained_state_bytes,
        )
        assert off.peak_bytes == off.weights_bytes + off.trained_state_bytes + off.activations_bytes
    assert at(4096, False, "bf16").activations_bytes < at(4096, False).activations_bytes


def test_a_forward_pass_holds_the_batch_up_to_the_token_budget():
    assert forward_tokens(batch_size=4, sequence_tokens=100, budget=16_384) == 400
    assert forward_tokens(batch_size=64, sequence_tokens=512, budget=16_384) == 16_384
    assert forward_tokens(batch_size=8, sequence_tokens=4096, budget=1024) == 4096  # alone
    assert (
        forward_tokens(batch_size=4, sequence_tokens=100, budget=150, sequences_per_example=2)
        == 200
    )


def test_the_constants_copied_from_torch_modules_match_theirs():
    assert FUSED_MODEL_TYPES == fused_loss.FUSED_MODEL_TYPES
    assert CHUNK_ROWS == fused_loss.CHUNK_ROWS
    assert default_tokens_per_forward(torch.device("cuda")) == GPU_TOKENS_PER_FORWARD


def _dry_run_estimate(tmp_path, tiny_registry, cache_dir, **hyperparameters):
    rows = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = parse_spec(
        {
            "model": "tiny-llama",
            "validation_split": 0.0,
            "method": {"type": "lora", "r": 4},
            "hyperparameters": {"batch_size": 4, "max_seq_length": 64} | hyperparameters,
        }
    )
    figures = Throughput.of(100.0, load_seconds=1.0, seconds_per_checkpoint=1.0, basis="test")
    estimate = estimate_job(
        spec, DataPaths(data), registry=tiny_registry, cache_dir=cache_dir, throughput=figures
    )
    return estimate, estimate.as_dict()["memory"]


def test_the_dry_run_reports_the_peak_with_checkpointing_off_and_on(
    tmp_path, tiny_registry, cache_dir
):
    estimate, memory = _dry_run_estimate(tmp_path, tiny_registry, cache_dir)

    parts = ("weights_bytes", "trained_state_bytes", "activations_bytes")
    assert memory["peak_bytes"] == sum(memory[part] for part in parts)
    assert memory["compute_dtype"] == "bf16"  # "auto", as a GPU with bf16 runs it
    assert memory["gradient_checkpointing"] is False  # "auto" is off
    by = memory["peak_bytes_by_checkpointing"]
    assert by["off"] == memory["peak_bytes"] > by["on"]
    # a micro-batch of 4 examples, each at most its longest training sequence
    longest = max(1, estimate.train_tokens_per_epoch // estimate.n_train)
    assert longest <= memory["tokens_per_forward"] <= 4 * 64

    _, on = _dry_run_estimate(
        tmp_path, tiny_registry, cache_dir, gradient_checkpointing=True, precision="fp32"
    )
    assert on["gradient_checkpointing"] is True and on["compute_dtype"] == "fp32"
    assert on["peak_bytes"] == on["peak_bytes_by_checkpointing"]["on"]
    assert on["weights_bytes"] > memory["weights_bytes"]  # 4 bytes a weight, not 2


def test_on_two_ranks_full_fine_tuning_holds_half_its_state_on_each_and_lora_all_of_it(
    tiny_model_dir,
):
    """What routing by memory counts for `resources.gpus`: FSDP splits full fine-tuning's
    weights and trained state over the ranks (plus one block gathered whole); data
    parallel keeps the whole model and adapter on each rank."""
    shape = read_model_shape(tiny_model_dir)
    full = estimate_memory(shape, FullMethod(), tokens=512, precision="bf16", checkpointing=False)
    two = per_rank(full, shape, 2, sharded=True)
    assert (two.ranks, two.sharded) == (2, True)
    assert two.trained_state_bytes == -(-full.trained_state_bytes // 2)
    block = 8 * full.trained_parameters // shape.layers  # one block and its gradient, fp32
    assert two.weights_bytes == -(-full.weights_bytes // 2) + block
    assert two.peak_bytes < full.peak_bytes
    lora = estimate_memory(shape, LoraMethod(), tokens=512, precision="bf16", checkpointing=False)
    replicated = per_rank(lora, shape, 2, sharded=False)
    assert replicated.peak_bytes == lora.peak_bytes and replicated.ranks == 2
