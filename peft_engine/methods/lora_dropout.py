"""LoRA's input dropout fused into its down-projection: cheaper randomness, less memory.

peft computes `lora_B(lora_A(dropout(x)))`. `nn.Dropout` draws one float per element with
`bernoulli_` (on this machine's CPU, a tenth of a LoRA step's time at dropout 0.05) and
autograd keeps both its output (float32) and its mask for every adapted layer, although
q, k, v (and gate, up) all read the same `x`: the copies cost more activation memory than
the layers they feed.

`DropoutLinear` replaces `lora_A` (same `nn.Linear`, same parameter, same state-dict key)
and does `linear(dropout(x), A)` in one autograd function that keeps only a reference to
`x`, which autograd keeps anyway, and a one-byte mask; the backward recomputes `x * mask`
(the 1 / (1 - p) scale is applied to the rank-r side, r numbers a token instead of
thousands). The mask draws 16 random bits per element (`randint`, several times
faster than `bernoulli_`), so the drop probability is `p` rounded to a multiple of 1/65536
(0.05 becomes 0.0500031). Same expectation, same distribution of kept elements otherwise;
a different random stream from peft's, so runs with dropout match peft's statistically,
not bit for bit. With dropout 0 nothing is replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


class _DropoutMatmul(torch.autograd.Function):
    """`linear(x * keep * scale, weight)`, the scale applied on the rank-r side (cheaper)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, threshold: int, scale: float
    ) -> torch.Tensor:
        keep = _keep_mask(x, threshold)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(torch.where(keep, x, 0.0), weight) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, keep = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, grad @ weight, 0.0)
        if ctx.needs_input_grad[1]:
            dropped = torch.where(keep, x, 0.0).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped
        return grad_x, grad_w, None, None


def _keep_mask(x: torch.Tensor, threshold: int) -> torch.Tensor:
    bits = torch.randint(-(_LEVELS // 2), _LEVELS // 2, x.shape, dtype=torch.int16, device=x.device)
    # an int16 tensor on the right: a Python int would promote the comparison (4x slower)
    return bits >= torch.tensor(threshold - _LEVELS // 2, dtype=torch.int16, device=x.device)


class DropoutLinear(nn.Linear):
    """`nn.Linear` (no bias) whose input is dropped with probability `p` while training."""

    p: float

    @classmethod
    def replacing(cls, linear: nn.Linear, p: float) -> DropoutLinear:
        if linear.bias is not None:
            raise ValueError("LoRA's down-projection has no bias")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = linear.weight  # the same Parameter: optimizer, state dict unchanged
        module.register_parameter("bias", None)
        module.p = p
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return F.linear(x, self.weight)
        threshold = round(self.p * _LEVELS)
        return _DropoutMatmul.apply(x, self.weight, threshold, _LEVELS / (_LEVELS - threshold))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


def fuse_lora_dropout(model: nn.Module) -> int:
    """Fuse dropout into `lora_A` in every plain LoRA layer on a linear layer; the count.

    DoRA and other variants (whose forward uses the dropped input elsewhere too) and
    non-linear bases (convolutions, embeddings) keep peft's own modules.
    """
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0.0:
                continue
            if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name):
                continue
            lora_a = module.lora_A[name]
            if type(lora_a) is not nn.Linear:
                continue
            module.lora_A[name] = DropoutLinear.replacing(lora_a, dropout.p)
            module.lora_dropout[name] = nn.Identity()
            fused += 1
    return fused
