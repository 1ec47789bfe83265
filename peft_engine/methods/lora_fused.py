"""A plain LoRA layer on a linear layer in one autograd function: fewer passes, less memory.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: on a CPU every piece is a
pass over memory. For a layer with `out` outputs and `in` inputs, a token costs passes over
`out` numbers for `lora_B`'s output, its scaling and the sum; `nn.Dropout` draws one float
per element of `x` with `bernoulli_` (a tenth of a LoRA step's time at dropout 0.05), and
autograd keeps the dropped copy of `x` (float32) in every adapted layer, although q, k, v
(and gate, up) all read the same `x`.

`fuse_lora` gives each plain LoRA layer on an `nn.Linear` a forward that runs
`_LoraLinear`: the base output is computed, then `lora_B`'s product is accumulated into it
in the same matrix multiplication (`addmm_`), with LoRA's scaling and dropout's 1 / (1 - p)
applied on the rank-r side (r numbers a token instead of thousands). It keeps a reference
to `x` (which the base layer's backward needs anyway), a one-byte mask and the r numbers a
token of `lora_A`'s output; the backward recomputes `x * mask`. Whatever this does not cover
(adapters disabled or merged, several active adapters, a mixed batch, DoRA and other
variants, a trained base weight, another dtype) goes through peft's own forward, unchanged,
and is counted in `FALLBACKS` by reason; a reason a training job should not meet (another
dtype, extra arguments, a trained base weight) also warns, once, since the job runs slower.
Under a mixed-precision job's autocast the dtypes may differ: the fused path casts its
inputs to the autocast dtype, as autocast would, and runs outside it.
`fuse_lora` relies on peft's LoRA layer internals (tested with peft 0.21) and raises
`PeftInternalsChanged` when those it reads are gone, rather than fusing nothing.

`DropoutLinear` replaces `lora_A` when dropout is on (same parameter, same state-dict key):
it carries `p`, and does the same dropout when peft's forward calls it. The mask draws 16
random bits per element (four from each random int64, many times faster than
`bernoulli_`), so the drop probability is `p` rounded to a multiple of 1/65536 (0.05
becomes 0.0500031). Same expectation, same distribution of kept elements otherwise; a
different random stream from peft's, so runs with dropout match peft's statistically, not
bit for bit. tests/test_lora_fused_path.py holds the outputs and gradients to peft's.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16

# What fuse_lora and the fused forward read on peft's LoRA `Linear` layer.
PEFT_LAYER_ATTRIBUTES = (
    "base_layer",
    "lora_A",
    "lora_B",
    "lora_dropout",
    "scaling",
    "use_dora",
    "lora_variant",
    "fan_in_fan_out",
    "active_adapters",
    "disable_adapters",
    "merged",
)
# peft's `Linear.forward(self, x, *args, **kwargs)`, which the fused forward stands in for.
PEFT_FORWARD_PARAMETERS = ("self", "x", "args", "kwargs")

# How often a fused layer handed a call to peft's forward, by reason.
FALLBACKS: Counter[str] = Counter()
# Reasons that are a state the caller chose (generation without adapters, several adapters):
# counted, not warned about.
_CHOSEN = frozenset({"adapters disabled or merged", "not one plain active adapter"})


class PeftInternalsChanged(RuntimeError):
    """peft's LoRA layer no longer has what the fused path reads: a peft outside the pins."""


class _DropoutMatmul(torch.autograd.Function):
    """`linear(x * keep * scale, weight)`, the scale applied on the rank-r side (cheaper)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, threshold: int, scale: float
    ) -> torch.Tensor:
        keep = _keep_mask(x, threshold)
        ctx.save_for_backward(x, weight, keep)
        ctx.scale = scale
        return F.linear(keep.to(x.dtype).mul_(x), weight) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight, keep = ctx.saved_tensors
        grad = grad * ctx.scale
        grad_x = grad_w = None
        mask = keep.to(x.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight).mul_(mask)
        if ctx.needs_input_grad[1]:
            dropped = mask.mul_(x).reshape(-1, x.shape[-1])
            grad_w = grad.reshape(-1, grad.shape[-1]).t() @ dropped
        return grad_x, grad_w, None, None


def _keep_mask(x: torch.Tensor, threshold: int) -> torch.Tensor:
    """1 where an element is kept, else 0 (uint8): 16 uniform random bits >= threshold (of
    65536).

    The bits come 64 at a time: uniform int64 words over their whole range, read as four
    int16 each (`randint` into int16 draws one 32-bit number per element, 3.6 times slower
    on this machine's CPU). The mask is uint8 rather than bool: on the CPU a comparison
    writes uint8 three times faster, and uint8 converts to float by vector instructions
    where bool does not (7 times faster): masks are applied as `keep.to(dtype).mul_(x)`.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)  # from the minimum to the maximum int64: all 64 bits
    bits = words.view(torch.int16)[:n].view(x.shape)
    keep = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    # an int16 tensor on the right: a Python int would promote the comparison (4x slower)
    edge = torch.tensor(threshold - _LEVELS // 2, dtype=torch.int16, device=x.device)
    return torch.ge(bits, edge, out=keep)


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
        scale, device = _LEVELS / (_LEVELS - threshold), x.device.type
        if not torch.is_autocast_enabled(device):
            return _DropoutMatmul.apply(x, self.weight, threshold, scale)
        dtype = torch.get_autocast_dtype(device)  # as in _fused_forward
        with torch.autocast(device, enabled=False):
            return _DropoutMatmul.apply(x.to(dtype), self.weight.to(dtype), threshold, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout={self.p}"


class _LoraLinear(torch.autograd.Function):
    """`linear(x, weight, bias) + (linear(x * keep, lora_a) * scale) @ lora_b.T`, the sum
    accumulated by the second matrix multiplication. `scale` is LoRA's scaling times
    dropout's 1 / (1 - p); `threshold` 0 means no dropout."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        threshold: int,
        scale: float,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        keep = _keep_mask(flat, threshold) if threshold else None
        down = F.linear(keep.to(flat.dtype).mul_(flat) if keep is not None else flat, lora_a)
        down.mul_(scale)
        out = F.linear(flat, weight, bias)
        out.addmm_(down, lora_b.t())
        ctx.save_for_backward(flat, weight, lora_a, lora_b, keep, down)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        flat, weight, lora_a, lora_b, keep, down = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_down = (g @ lora_b).mul_(ctx.scale)  # through the scale to lora_a's output
        mask = keep.to(g.dtype) if keep is not None else None
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if mask is None:
                grad_x.addmm_(grad_down, lora_a)
            else:
                grad_x.addcmul_(grad_down @ lora_a, mask)
            grad_x = grad_x.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:  # after grad_x: the mask becomes the dropped input here
            grad_a = grad_down.t() @ (mask.mul_(flat) if mask is not None else flat)
        if ctx.needs_input_grad[4]:
            grad_b = g.t() @ down
        return grad_x, None, None, grad_a, grad_b, None, None


def _peft_reason(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """Why this call of a fused layer must go through peft's forward; None: it need not."""
    if args or kwargs:
        return "extra arguments"
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return "not one plain active adapter"
    name = active[0]
    weight, lora_a, lora_b = layer.base_layer.weight, layer.lora_A[name], layer.lora_B[name]
    if weight.requires_grad:
        return "the base weight trains"
    if lora_b.bias is not None:
        return "lora_B has a bias"
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return "a dropout module"
    mixed = torch.is_autocast_enabled(x.device.type)  # _fused_forward casts them all
    if not mixed and not (x.dtype == weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        return "the input, base and adapter dtypes differ"
    return None


def _fall_back(layer: Any, reason: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """peft's own forward for this call, counted; the first of an unexpected kind warns."""
    FALLBACKS[reason] += 1
    if FALLBACKS[reason] == 1 and reason not in _CHOSEN:
        warnings.warn(
            f"fused LoRA: {reason}, so LoRA layers run peft's slower forward "
            "(counted in peft_engine.methods.lora_fused.FALLBACKS)",
            RuntimeWarning,
            stacklevel=3,
        )
    return layer._peft_forward(x, *args, **kwargs)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A plain LoRA layer's forward through `_LoraLinear`, else peft's (`_peft_forward`)."""
    reason = _peft_reason(self, x, args, kwargs)
    if reason is not None:
        return _fall_back(self, reason, x, *args, **kwargs)
    name = self.active_adapters[0]
    base, lora_a, lora_b = self.base_layer, self.lora_A[name], self.lora_B[name]
    p = getattr(lora_a, "p", 0.0) if lora_a.training else 0.0
    threshold = round(p * _LEVELS)
    scale = self.scaling[name] * (_LEVELS / (_LEVELS - threshold))
    tensors = (x, base.weight, base.bias, lora_a.weight, lora_b.weight)
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return _LoraLinear.apply(*tensors, threshold, scale)
    # Mixed precision: autocast does not reach an autograd function's backward, so cast here
    # as autocast would (float32 adapters get their gradients back in float32) and run the
    # function outside it.
    dtype = torch.get_autocast_dtype(device)
    cast = (t.to(dtype) if t is not None else None for t in tensors)
    with torch.autocast(device, enabled=False):
        return _LoraLinear.apply(*cast, threshold, scale)


def _check_peft_layer(layer: Any) -> None:
    """Raise PeftInternalsChanged when peft's LoRA layer lacks what the fused path reads."""
    forward = tuple(inspect.signature(type(layer).forward).parameters)
    missing = [name for name in PEFT_LAYER_ATTRIBUTES if not hasattr(layer, name)]
    if forward == PEFT_FORWARD_PARAMETERS and not missing:
        return
    import peft

    raise PeftInternalsChanged(
        f"peft {peft.__version__}: its LoRA Linear layer is not the one the fused path was "
        f"written for (forward{forward}, missing {missing}); install peft within the pins"
    )


def fuse_lora(model: nn.Module) -> int:
    """Give every plain LoRA layer on an `nn.Linear` the fused forward, with its dropout
    inside (`DropoutLinear` as `lora_A`); the number of layers.

    DoRA and other variants, `lora_bias`, and bases that are not a plain `nn.Linear`
    (convolutions, embeddings, GPT-2's transposed Conv1D) keep peft's own modules. A peft
    whose LoRA layer lacks what this reads raises PeftInternalsChanged.
    """
    from peft.tuners.lora import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear):
            continue
        _check_peft_layer(module)
        if type(module.base_layer) is not nn.Linear or module.fan_in_fan_out:
            continue
        plain = []
        for name, lora_a in module.lora_A.items():
            if name in module.lora_variant or module.use_dora.get(name):
                continue
            if type(lora_a) is not nn.Linear or module.lora_B[name].bias is not None:
                continue
            dropout = module.lora_dropout[name]
            if isinstance(dropout, nn.Dropout) and dropout.p > 0.0:
                module.lora_A[name] = DropoutLinear.replacing(lora_a, dropout.p)
                module.lora_dropout[name] = nn.Identity()
            elif not isinstance(dropout, nn.Identity | nn.Dropout):
                continue
            else:
                module.lora_dropout[name] = nn.Identity()
            plain.append(name)
        if plain:
            module._peft_forward = module.forward
            module.forward = MethodType(_fused_forward, module)
            fused += 1
    return fused
