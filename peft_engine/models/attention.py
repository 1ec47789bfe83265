"""Attention for packed rows: each example attends within itself, and nothing else is computed.

A packed micro-batch is one row of several examples whose position ids restart at 0.
transformers' `sdpa` path reads those boundaries into a block-diagonal mask over the whole
row, then computes every query against every key of the row and masks most of the result
away: for a row of n examples of similar length that is n times the attention work that
matters, and a masked call also loses the kernels that skip the causal half (on this
machine's CPU it was a third of a LoRA step's time). `packed_attention` runs
`scaled_dot_product_attention` once per example with `is_causal=True` instead, which is
exactly the same arithmetic per example, and keeps grouped-query attention unexpanded.

The model keeps a mask-building implementation (`sdpa`'s), so padded batches (evaluation
without packing, prompt learning) and anything this function does not handle (sliding
windows shorter than an example, soft-capping, attention sinks) go through the ordinary
`sdpa` path with its mask; only a call that carries the row's boundaries (`cu_seq_lens_q`,
as the engine's packed batches do) takes the per-example path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "tuneq_packed"

_registered = False


def use_packed_attention(model: Any) -> bool:
    """Switch a transformers model from `sdpa` to the packed implementation, in place.

    Returns False (and changes nothing) for a model not on `sdpa`: eager attention has its
    reasons (a family that needs it), and flash-attention already handles packed rows.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    _register()
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


def packed_forward_kwargs(cu_seqlens: torch.Tensor, max_length: int) -> dict[str, Any]:
    """What a packed batch passes to the model's forward (flash-attention's names)."""
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None or not _per_example_is_exact(query, key, cu_seqlens, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    bounds = cu_seqlens.tolist()
    outputs = [
        F.scaled_dot_product_attention(
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
            enable_gqa=groups > 1,
        )
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        if end > start
    ]
    # (batch, tokens, heads, dim) as the model reads it, written once: a cat of the
    # transposed outputs rather than a cat, then a copy to make the transpose contiguous.
    return torch.cat([out.transpose(1, 2) for out in outputs], dim=1), None


def _per_example_is_exact(
    query: torch.Tensor, key: torch.Tensor, cu_seqlens: torch.Tensor, kwargs: dict[str, Any]
) -> bool:
    """Whether plain causal attention within each example is what the model computes."""
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:  # one packed row, no cache
        return False
    if int(cu_seqlens[-1]) != query.shape[2]:
        return False
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return False
    if kwargs.get("position_bias") is not None:
        return False
    window = kwargs.get("sliding_window")
    if window is not None:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        if longest > window:  # a window shorter than an example masks more than causality
            return False
    return query.shape[-1] == key.shape[-1]


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    # Masks are built as for sdpa, so the fallback path has the mask it needs.
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    _registered = True
