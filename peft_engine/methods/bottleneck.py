"""Bottleneck adapters (Houlsby et al. 2019): small trained MLPs inside a frozen transformer.

An adapter is a residual bottleneck, `x + up(dropout(act(down(x))))`: `down` projects the
hidden state to a few dimensions (`bottleneck`), a non-linearity acts on it, and `up`
projects it back. Houlsby et al. put one after each sub-layer's output projection, twice per
transformer layer: after the attention output projection and after the feed-forward output
projection, before the residual add and layer norm that follow. `AdaptedLinear` wraps those
projections (`bottleneck_layers`) so that is exactly where they act (BERT/RoBERTa/ELECTRA/DeBERTa
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

from peft_engine.methods.common import (
    BERT_LIKE,
    LLAMA_LIKE,
    TASK_HEAD,
    TEXT_TASKS,
    MethodSpec,
    unfreeze_task_head,
)
from peft_engine.methods.registry import MethodDef, register
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


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def find_targets(model: nn.Module, target_modules: Literal["auto"] | list[str]) -> list[str]:
    """The names of the linear layers to adapt, in module order.

    Heads (`classifier`, `lm_head`) and layers inside an `AdaptedLinear` are never included.
    """
    from torch import nn

    from peft_engine.methods.bottleneck_layers import AdaptedLinear

    suffixes = AUTO_TARGETS if target_modules == "auto" else tuple(target_modules)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
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
    from peft_engine.methods.bottleneck_layers import AdaptedLinear, BottleneckAdapter

    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
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
        adapter = BottleneckAdapter(
            base_layer.out_features,
            spec.bottleneck,
            spec.activation,
            spec.dropout,
            device=weight.device,
            dtype=weight.dtype if weight.is_floating_point() else None,
        )
        adapter.train(base_layer.training)
        adapter.requires_grad_(True)
        setattr(parent, child_name, AdaptedLinear(base_layer, adapter))
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
        families=(*BERT_LIKE, "vit", *LLAMA_LIKE),
    )
)
