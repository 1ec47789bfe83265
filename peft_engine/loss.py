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
from peft_engine.tasks.base import ExampleLosses, ExampleResult, LossSum


def batch_loss(
    model: Any, batch: Batch, *, fused: bool = True, per_example: bool = True
) -> LossSum:
    """Summed next-token loss of a batch; the output layer runs on loss positions only.

    Where `fused_parts` knows the model's output layer, the loss goes through it in chunks
    (`linear_cross_entropy`), so no full-vocabulary logits outlive a chunk; otherwise (or
    with `fused=False`) the model's own head gives the logits of the loss positions. With
    `per_example`, the token losses are also summed per example (`LossSum.examples`).
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
        loss, correct, token_losses = linear_cross_entropy(
            hidden.flatten(0, 1), head.weight, targets.flatten(), IGNORE, per_row=per_example
        )
    else:
        logits = model(**inputs, logits_to_keep=keep).logits.float()
        loss, correct, token_losses = token_cross_entropy(logits, targets, per_example)
    examples = (
        example_losses(batch, batch.example_of_position()[:, keep.cpu()], token_losses)
        if token_losses is not None
        else None
    )
    return LossSum(loss, batch.n_loss_tokens, correct, examples)


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, per_token: bool
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Summed cross-entropy of (rows, length, vocab) logits, the correct count, and with
    `per_token` the flat per-position losses (0 where ignored)."""
    flat_logits, flat_targets = logits.flatten(0, 1), targets.flatten()
    if per_token:
        token_losses = F.cross_entropy(
            flat_logits, flat_targets, ignore_index=IGNORE, reduction="none"
        )
        loss = token_losses.sum()
    else:
        token_losses = None
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    with torch.no_grad():
        correct = int(((logits.argmax(-1) == targets) & (targets != IGNORE)).sum())
    return loss, correct, token_losses


def example_losses(batch: Batch, owner: torch.Tensor, token_losses: torch.Tensor) -> ExampleLosses:
    """The token losses summed per example; `owner` gives each loss position's example."""
    return ExampleLosses.from_items(
        batch.lines, batch.example_loss_tokens, owner.flatten(), token_losses
    )


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[Batch],
    device: torch.device,
    loss: Callable[[Any, Batch], LossSum] = batch_loss,
) -> tuple[dict[str, float], list[ExampleResult]]:
    """Mean loss per target token, its perplexity, and next-token accuracy; and each
    example's summed loss."""
    was_training = model.training
    model.eval()
    loss_total, tokens, correct = 0.0, 0, 0
    examples: list[ExampleResult] = []
    for batch in batches:
        result = loss(model, batch.to(device))
        loss_total += float(result.loss)
        tokens += result.n_loss_tokens
        correct += result.n_correct
        if result.examples is not None:
            examples += example_results(result.examples)
    model.train(was_training)
    eval_loss = loss_total / max(tokens, 1)
    metrics = {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "eval_token_accuracy": correct / max(tokens, 1),
    }
    return metrics, examples


def example_results(losses: ExampleLosses) -> list[ExampleResult]:
    return [
        ExampleResult(line, loss, n_items)
        for line, loss, n_items in zip(
            losses.lines, losses.loss.tolist(), losses.n_items, strict=True
        )
    ]
