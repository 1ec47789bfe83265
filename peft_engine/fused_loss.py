"""Cross-entropy through the output layer in chunks: full-vocabulary logits never stay alive.

A causal LM's loss needs, per loss token, a row of logits as wide as the vocabulary (49,152
floats for SmolLM2, 196 KB), then its log-softmax, then that row's gradient: three such
rows per token live at once when autograd does it, hundreds of megabytes for a micro-batch,
and the largest activations a small model has. `linear_cross_entropy` takes the hidden
states of the loss positions instead and, chunk by chunk, computes the logits, the summed
loss, the number of correct argmax predictions, and at once the gradient with respect to
the hidden states (and to the output weight, when it is trained); autograd keeps only that
gradient, `hidden`-sized. The arithmetic is the same as `F.cross_entropy(hidden @ W.T,
targets, reduction="sum")` up to float summation order (tests/test_fused_loss.py checks
1e-5); the matmuls are the same ones, so it costs no extra time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

CHUNK_ROWS = 256  # rows of logits alive at once: 256 x 49,152 x 4 B = 48 MiB

# Families whose logits are exactly `lm_head(decoder(...).last_hidden_state)`: no logit
# soft-capping, scaling or bias. Others keep the plain path.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gpt2"})


def fused_parts(model: Any) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output layer) when the fused loss computes this model's loss exactly."""
    cached = getattr(model, "_tuneq_fused_parts", False)
    if cached is not False:
        return cached
    parts = _find_parts(model)
    model._tuneq_fused_parts = parts  # looked up once per model, not once per batch
    return parts


def _find_parts(model: Any) -> tuple[nn.Module, nn.Linear] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    if isinstance(base, FSDPModule):  # a sharded head weight is whole only in its forward
        return None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:  # e.g. a LoRA-wrapped head
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        return None
    return decoder, head


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    *,
    per_row: bool = False,
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, the correct count, and
    with `per_row` each row's loss (0 where ignored; detached), else None.

    `hidden` is (n, d), `weight` (vocab, d), `targets` (n,). Logits are computed in float32.
    """
    with torch.autocast(hidden.device.type, enabled=False):  # under a job's autocast too
        loss, correct, rows = _LinearCrossEntropy.apply(
            hidden, weight, targets, ignore_index, per_row
        )
    return loss, int(correct), rows if per_row else None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        ignore_index: int,
        per_row: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        rows = torch.zeros(hidden.shape[0] if per_row else 0, device=hidden.device)
        w32 = weight.float()
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            h = hidden[start : start + CHUNK_ROWS]
            t = targets[start : start + CHUNK_ROWS]
            valid = t != ignore_index
            safe = torch.where(valid, t, 0)
            logits = h.float() @ w32.t()  # (chunk, vocab)
            correct += ((logits.argmax(-1) == t) & valid).sum()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            row_loss = (lse - picked) * valid
            total += row_loss.sum()
            if per_row:
                rows[start : start + CHUNK_ROWS] = row_loss
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss)/d(logits) = softmax - onehot(target), zero on ignored rows; in place.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[torch.arange(len(t), device=t.device), safe] -= 1.0
            grad_logits *= valid[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + CHUNK_ROWS] = (grad_logits @ w32).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h.float()
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
        )
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(correct, rows)
        return total, correct, rows

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, _grad_correct: Any, _grad_rows: Any
    ) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_out = grad_hidden * grad_loss.to(grad_hidden.dtype) if grad_hidden.numel() else None
        weight_out = (grad_weight * grad_loss).to(ctx.weight_dtype) if grad_weight.numel() else None
        return hidden_out, weight_out, None, None, None
