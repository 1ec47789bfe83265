"""The torch modules of bottleneck adapters: the adapter itself and the layer it wraps.

Kept apart from `bottleneck` (the spec and builder), which the API imports to validate specs
and which must not import torch; the builder imports this module when it runs. The attribute
names (`base_layer`, `adapter`, `down`, `up`) are the saved tensors' names.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """`x + up(dropout(act(down(x))))`; `up` is zero at init: it starts as the identity."""

    def __init__(
        self,
        hidden: int,
        bottleneck: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        *,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`down` small and random (torch's global RNG), `up` zero: the identity map."""
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.dropout(self.act(self.down(x))))


class AdaptedLinear(nn.Module):
    """A frozen linear layer (`base_layer`) followed by a bottleneck `adapter`."""

    def __init__(self, base_layer: nn.Linear, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    # What model code may read from the layer it replaced.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))
