"""Bottleneck adapters (Houlsby et al. 2019): small trained MLPs inside a frozen transformer.

An adapter is a residual bottleneck, `x + up(dropout(act(down(x))))`: `down` projects the
hidden state to a few dimensions (`bottleneck`), a non-linearity acts on it, and `up`
projects it back. Houlsby et al. put one after each sub-layer's output projection, twice per
transformer layer: after the attention output projection and after the feed-forward output
projection, before the residual add and layer norm that follow. `AdaptedLinear` wraps those
projections so that is exactly where they act (BERT/RoBERTa/ELECTRA/DeBERTa
`attention.output.dense` and `output.dense`, Llama/Mistral/Qwen `self_attn.o_proj` and
`mlp.down_proj`, ViT `attention.o_proj` and `mlp.fc2`, DistilBERT `attention.out_lin` and
`ffn.lin2`); `target_modules` names others by suffix. The heads (`classifier`, `lm_head`)
are never adapted. Only the adapters train, and the task head of a classification model:
each adapter holds 2·hidden·bottleneck + bottleneck + hidden parameters, two per layer.

`up` starts at zero (weight and bias), so every adapter starts as the identity and the
adapted model computes exactly what the base model does: training starts from the
pretrained function, not a perturbed one. `down` starts small and random (normal, std 1e-2,
from torch's global RNG, which the engine seeds before building) so the gradient reaching
`up` is not zero.

peft has no such method, so this is our own module and its output is the trained tensors
themselves (`TRAINED_WEIGHTS`: every trainable parameter, by name, so
`...attention.output.dense.adapter.down.weight` and so on, and a task head's). To reload:
build the base model, apply `build_bottleneck` with the same spec, and
`load_state_dict(tensors, strict=False)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import TASK_HEAD, TEXT_TASKS, MethodSpec, unfreeze_task_head
from peft_engine.methods.weights import TRAINED_WEIGHTS

if TYPE_CHECKING:
    from torch import nn

# The projections `auto` adapts, as module-name suffixes: each layer's attention output and
# FFN output. BERT's `layer.N.output.dense` is the FFN output (`intermediate.dense` is the
# FFN input, never adapted); `attention.output.dense` also ends with `output.dense` and is
# listed for clarity.
AUTO_TARGETS: tuple[str, ...] = (
    "attention.output.dense",  # BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa: attention out
    "output.dense",  # the same families: FFN out
    "self_attn.o_proj",  # Llama, Mistral, Qwen2/3: attention out
    "mlp.down_proj",  # the same families: FFN out
    "attention.o_proj",  # ViT (transformers 5: `layers.N.attention.o_proj`): attention out
    "mlp.fc2",  # ViT: FFN out
    "attention.out_lin",  # DistilBERT: attention out
    "ffn.lin2",  # DistilBERT: FFN out
)
# Heads are never adapted: the task head trains whole, the LM head stays as it is.
EXCLUDED = (TASK_HEAD, "lm_head")

TargetSuffix = Annotated[str, Field(min_length=1)]


class BottleneckAdapterMethod(MethodSpec):
    type: Literal["bottleneck_adapter"] = "bottleneck_adapter"
    bottleneck: int = Field(64, ge=1, le=4096)  # the adapter's inner size
    activation: Literal["gelu", "relu", "tanh"] = "gelu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # "auto": after each layer's attention and FFN output projections; or name suffixes.
    target_modules: Literal["auto"] | Annotated[list[TargetSuffix], Field(min_length=1)] = "auto"


# The torch modules. `peft_engine.methods` is imported by the API to validate specs and must
# not import torch, so they are defined on first use: `from ...bottleneck import
# AdaptedLinear` (or any attribute access) defines both, once, as ordinary module globals.
_TORCH_MODULES = ("BottleneckAdapter", "AdaptedLinear")


def _define_torch_modules() -> None:
    import torch
    from torch import nn

    activations: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}

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
            self.act = activations[activation]()
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

    for cls in (BottleneckAdapter, AdaptedLinear):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls


def __getattr__(name: str) -> Any:
    """`BottleneckAdapter` and `AdaptedLinear`, defined (importing torch) on first access."""
    if name in _TORCH_MODULES:
        _define_torch_modules()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torch_modules() -> tuple[Any, Any]:
    if "AdaptedLinear" not in globals():
        _define_torch_modules()
    return globals()["BottleneckAdapter"], globals()["AdaptedLinear"]


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def find_targets(model: nn.Module, target_modules: Literal["auto"] | list[str]) -> list[str]:
    """The names of the linear layers to adapt, in module order.

    Heads (`classifier`, `lm_head`) and layers inside an `AdaptedLinear` are never included.
    """
    from torch import nn

    _, adapted_linear = _torch_modules()
    suffixes = AUTO_TARGETS if target_modules == "auto" else tuple(target_modules)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, adapted_linear)]
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not _matches(name, suffixes):
            continue
        if any(part in EXCLUDED for part in name.split(".")):
            continue
        if any(name.startswith(w + ".") for w in wrapped):  # never adapt an adapted layer
            continue
        names.append(name)
    return names


def build_bottleneck(model: Any, spec: BottleneckAdapterMethod, task: str) -> Any:
    """Freeze the model, put an adapter after each target projection, train the adapters.

    Changes `model` in place and returns it. The classification head of a head task trains
    too. A model that already has adapters is refused: build on a fresh base model.
    """
    bottleneck_adapter, adapted_linear = _torch_modules()
    if any(isinstance(m, adapted_linear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already has bottleneck adapters; "
            "apply build_bottleneck to a fresh base model"
        )
    targets = find_targets(model, spec.target_modules)
    if not targets:
        what = (
            "no attention/FFN output projections"
            if spec.target_modules == "auto"
            else f"no linear layers matching target_modules {spec.target_modules}"
        )
        raise ValueError(f"{what} found in {type(model).__name__}; name them in target_modules")

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base_layer = getattr(parent, child_name)
        weight = base_layer.weight
        adapter = bottleneck_adapter(
            base_layer.out_features,
            spec.bottleneck,
            spec.activation,
            spec.dropout,
            device=weight.device,
            dtype=weight.dtype if weight.is_floating_point() else None,
        )
        adapter.train(base_layer.training)
        adapter.requires_grad_(True)
        setattr(parent, child_name, adapted_linear(base_layer, adapter))
    unfreeze_task_head(model, task)
    return model


register(
    MethodDef(
        type="bottleneck_adapter",
        spec=BottleneckAdapterMethod,
        build=build_bottleneck,
        tasks=TEXT_TASKS,
        # Zero-initialised adapters with few parameters take larger steps than full tuning.
        default_learning_rate=lambda spec: 1e-3,
        weights=TRAINED_WEIGHTS,
        families=(
            "bert",
            "roberta",
            "xlm-roberta",
            "distilbert",
            "electra",
            "deberta",
            "deberta-v2",
            "vit",
            "llama",
            "mistral",
            "qwen2",
            "qwen3",
        ),
    )
)
