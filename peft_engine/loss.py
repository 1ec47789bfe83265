"""Next-token loss and evaluation, computed only where a target carries loss.

The output head runs on loss positions alone, so full-vocabulary logits are never
materialised for prompt, system or padding tokens, and for the loss positions only a chunk
at a time (peft_engine/fused_loss.py): with a 49k vocabulary they would be most of the
activation memory of a small model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from peft_engine.data.batching import Batch
from peft_engine.data.tokenize import IGNORE
from peft_engine.fused_loss import fused_parts, linear_cross_entropy
from peft_engine.models.attention import packed_forward_kwargs
from peft_engine.tasks.base import LossSum


def batch_loss(model: Any, batch: Batch, *, fused: bool = True) -> LossSum:
    """Summed next-token loss of a batch; the output layer runs on loss positions only.

    Where `fused_parts` knows the model's output layer, the loss goes through it in chunks
    (`linear_cross_entropy`), so no full-vocabulary logits outlive a chunk; otherwise (or
    with `fused=False`) the model's own head gives the logits of the loss positions.
    """
    keep = (batch.targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    inputs = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,  # with a cache, transformers ignores packed position ids
    }
    if batch.cu_seqlens is not None:  # the examples' bounds, for packed attention
        inputs.update(packed_forward_kwargs(batch.cu_seqlens, batch.longest))
    targets = batch.targets[:, keep]
    parts = fused_parts(model) if fused else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, keep]
        loss, correct = linear_cross_entropy(
            hidden.flatten(0, 1), head.weight, targets.flatten(), IGNORE
        )
        return LossSum(loss, batch.n_loss_tokens, correct)
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    loss = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    with torch.no_grad():
        correct = int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())
    return LossSum(loss, batch.n_loss_tokens, correct)


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[Batch],
    device: torch.device,
    loss: Callable[[Any, Batch], LossSum] = batch_loss,
) -> dict[str, float]:
    """Mean loss per target token, its perplexity, and next-token accuracy."""
    was_training = model.training
    model.eval()
    loss_total, tokens, correct = 0.0, 0, 0
    for batch in batches:
        result = loss(model, batch.to(device))
        loss_total += float(result.loss)
        tokens += result.n_loss_tokens
        correct += result.n_correct
    model.train(was_training)
    eval_loss = loss_total / max(tokens, 1)
    return {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "eval_token_accuracy": correct / max(tokens, 1),
    }
