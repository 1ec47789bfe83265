"""Packing without padding gives each example exactly the loss it has alone."""

from __future__ import annotations

import torch

from peft_engine.data.batching import collate, epoch_order, micro_batches, pack, pad
from peft_engine.data.formats import DataFormat, Example
from peft_engine.data.tokenize import IGNORE, tokenize_dataset
from tests.conftest import chat
from tests.engine_helpers import batch_logits, sdpa_llama, token_losses


def _examples(tokenizer):
    rows = [
        chat("What is 2 plus 2?", "4."),
        chat("Hello! How are you today?", "I am fine, thank you, and you?"),
        chat("Capital of France?", "Paris is the capital of France."),
    ]
    examples = [Example(i + 1, DataFormat.CHAT, r) for i, r in enumerate(rows)]
    return tokenize_dataset(examples, tokenizer, max_seq_length=256, train_on_inputs=False).examples


def _per_token_losses(model, batch):
    with torch.no_grad():
        logits = batch_logits(model, batch)
    return logits, token_losses(logits, batch)


def _load(tiny_model_dir):
    return sdpa_llama(tiny_model_dir, packed=False).eval()


def test_packed_per_example_loss_equals_padded(tiny_model_dir, tiny_tokenizer):
    model = _load(tiny_model_dir)
    examples = _examples(tiny_tokenizer)
    packed = pack(examples)
    padded = pad(examples, tiny_tokenizer.pad_token_id)
    assert packed.input_ids.shape == (1, sum(len(e.input_ids) for e in examples))
    assert packed.n_tokens == padded.n_tokens and packed.n_loss_tokens == padded.n_loss_tokens

    _, packed_losses = _per_token_losses(model, packed)
    _, padded_losses = _per_token_losses(model, padded)
    start = 0
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        alone = packed_losses[0, start : start + n]
        mask = torch.tensor(example.targets) != IGNORE
        torch.testing.assert_close(
            alone[mask].mean(), padded_losses[row, :n][mask].mean(), atol=1e-5, rtol=1e-5
        )
        start += n


def test_no_attention_across_packed_examples(tiny_model_dir, tiny_tokenizer):
    model = _load(tiny_model_dir)
    first, second, third = _examples(tiny_tokenizer)
    changed = type(second)(
        second.line, [(t + 7) % 300 for t in second.input_ids], second.targets, False
    )
    logits_a, _ = _per_token_losses(model, pack([first, second, third]))
    logits_b, _ = _per_token_losses(model, pack([first, changed, third]))
    n1, n2 = len(first.input_ids), len(second.input_ids)
    # Example 3 sees nothing of example 2: changing 2 leaves 3's logits as they were.
    torch.testing.assert_close(logits_a[0, n1 + n2 :], logits_b[0, n1 + n2 :], atol=1e-6, rtol=0)
    assert not torch.allclose(logits_a[0, n1 : n1 + n2], logits_b[0, n1 : n1 + n2])
    # And each packed example's logits equal those of the example run alone.
    alone, _ = _per_token_losses(model, pack([third]))
    torch.testing.assert_close(logits_a[0, n1 + n2 :], alone[0], atol=1e-5, rtol=1e-5)


def test_packed_positions_restart_per_example(tiny_tokenizer):
    examples = _examples(tiny_tokenizer)
    positions = pack(examples).position_ids[0].tolist()
    starts = [i for i, p in enumerate(positions) if p == 0]
    assert starts == [
        0,
        len(examples[0].input_ids),
        len(examples[0].input_ids) + len(examples[1].input_ids),
    ]


def test_padding_masks_and_ignores_pad_positions(tiny_tokenizer):
    examples = _examples(tiny_tokenizer)
    batch = collate(examples, packing=False, pad_token_id=tiny_tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert (batch.targets[row, n:] == IGNORE).all()


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch():
    assert sorted(epoch_order(10, seed=1, epoch=0)) == list(range(10))
    assert epoch_order(10, seed=1, epoch=0) == epoch_order(10, seed=1, epoch=0)
    assert epoch_order(10, seed=1, epoch=0) != epoch_order(10, seed=1, epoch=1)
    assert micro_batches(list("abcde"), [4, 3, 2, 1, 0], 2) == [["e", "d"], ["c", "b"], ["a"]]
