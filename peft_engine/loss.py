"""Next-token loss and evaluation, computed only where a target carries loss.

The output head runs on loss positions alone (`logits_to_keep`), so full-vocabulary logits
are never materialised for prompt, system or padding tokens: with a 49k vocabulary that is
most of the activation memory of a small model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from peft_engine.data.batching import Batch
from peft_engine.data.tokenize import IGNORE
from peft_engine.tasks import LossSum


def batch_loss(model: Any, batch: Batch) -> LossSum:
    keep = (batch.targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    out = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        logits_to_keep=keep,
        use_cache=False,  # with a cache, transformers ignores packed position ids: keep it off
    )
    logits = out.logits.float()
    targets = batch.targets[:, keep]
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
