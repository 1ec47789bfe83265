"""Packed attention (per-example `sdpa`) = the masked `sdpa` of transformers = each example
run alone, in values and gradients.

No test here looks at a clock: bench/train_throughput.py measures the speed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from peft_engine.data.batching import pack, pad
from peft_engine.data.tokenize import IGNORE
from peft_engine.models.attention import (
    PACKED_ATTENTION,
    packed_forward_kwargs,
    use_packed_attention,
)
from tests.engine_helpers import batch_logits, sdpa_llama, token_losses, tokenized_chat_examples


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return tokenized_chat_examples(tiny_tokenizer)


def _per_token_loss(model, batch, **extra):
    kwargs = {}
    if batch.cu_seqlens is not None and extra.get("bounds", True):
        kwargs = packed_forward_kwargs(batch.cu_seqlens, batch.longest)
    return token_losses(batch_logits(model, batch, **kwargs), batch)


def test_packed_attention_equals_masked_sdpa_and_each_example_alone(tiny_model_dir, examples):
    plain, packed = sdpa_llama(tiny_model_dir, False), sdpa_llama(tiny_model_dir, True)
    assert packed.config._attn_implementation == PACKED_ATTENTION
    batch = pack(examples)

    ours = _per_token_loss(packed, batch)
    masked = _per_token_loss(plain, batch)  # transformers' block-diagonal mask
    torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-5)
    start = 0
    for example in examples:  # each example alone, no packing at all
        n = len(example.input_ids)
        alone = _per_token_loss(plain, pad([example], 0))[0]
        torch.testing.assert_close(ours[0, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n

    # gradients with respect to every weight agree too
    for model in (plain, packed):
        model.zero_grad()
        _per_token_loss(model, batch).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), packed.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batches_and_calls_without_bounds_use_the_masked_path(tiny_model_dir, examples):
    plain, packed = sdpa_llama(tiny_model_dir, False), sdpa_llama(tiny_model_dir, True)
    padded = pad(examples, 0)
    mask = padded.targets != IGNORE
    torch.testing.assert_close(
        _per_token_loss(packed, padded)[mask], _per_token_loss(plain, padded)[mask]
    )
    batch = pack(examples)  # packed row, but no bounds passed: sdpa's own packed mask
    torch.testing.assert_close(
        _per_token_loss(packed, batch, bounds=False), _per_token_loss(plain, batch)
    )


def test_eager_models_are_left_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"
