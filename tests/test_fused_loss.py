"""The chunked output-layer cross-entropy = `F.cross_entropy` on the logits, within 1e-5:
loss, correct count and gradients (hidden states and a trained output layer).

No test here looks at a clock: bench/train_throughput.py measures the speed.
"""

from __future__ import annotations

import pytest
import torch

from peft_engine import fused_loss
from peft_engine.data.batching import pack, pad
from peft_engine.loss import batch_loss
from peft_engine.methods.lora import LoraMethod, build_lora
from tests.engine_helpers import randomise_lora_b, sdpa_llama, tokenized_chat_examples


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    return tokenized_chat_examples(tiny_tokenizer)


@pytest.mark.parametrize("chunk_rows", [256, 5])  # one chunk, and many with a ragged last one
def test_fused_loss_equals_plain_loss(tiny_model_dir, examples, chunk_rows, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    model = build_lora(sdpa_llama(tiny_model_dir, True), LoraMethod(dropout=0.0), "causal_lm")
    randomise_lora_b(model)
    assert fused_loss.fused_parts(model) is not None
    batch = pack(examples)

    results = {}
    for fused in (True, False):
        model.zero_grad()
        result = batch_loss(model, batch, fused=fused)
        result.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (result, grads)
    (ours, our_grads), (plain, plain_grads) = results[True], results[False]
    ours_loss, plain_loss = float(ours.loss.detach()), float(plain.loss.detach())
    assert abs(ours_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert ours.n_correct == plain.n_correct and ours.n_loss_tokens == plain.n_loss_tokens
    assert our_grads.keys() == plain_grads.keys() and our_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_loss_trains_the_output_layer_as_the_plain_one(tiny_model_dir, examples):
    """Full fine-tuning: the output layer's weight gets the same gradient."""
    model = sdpa_llama(tiny_model_dir, True)
    batch = pack(examples)
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        batch_loss(model, batch, fused=fused).loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads[True]["lm_head.weight"].abs().sum() > 0
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_loss_in_evaluation_and_on_gpt2(tiny_model_dir, tmp_path, tiny_tokenizer, examples):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256)
    ).eval()
    llama = sdpa_llama(tiny_model_dir, True).eval()
    for model in (gpt2, llama):
        assert fused_loss.fused_parts(model) is not None
        batch = pad(examples, 0)  # padded rows: the attention mask path
        with torch.no_grad():
            ours, plain = batch_loss(model, batch), batch_loss(model, batch, fused=False)
        assert float(ours.loss) == pytest.approx(float(plain.loss), rel=1e-5)
        assert ours.n_correct == plain.n_correct


def test_fused_loss_refuses_heads_it_cannot_reproduce(tiny_model_dir):
    model = sdpa_llama(tiny_model_dir, False)
    model.config.final_logit_softcapping = 30.0
    assert fused_loss.fused_parts(model) is None
    lora_on_head = build_lora(
        sdpa_llama(tiny_model_dir, False),
        LoraMethod(dropout=0.0, target_modules=["q_proj", "lm_head"]),
        "causal_lm",
    )
    assert fused_loss.fused_parts(lora_on_head) is None  # the head is a LoRA layer
