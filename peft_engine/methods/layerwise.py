"""Layer-wise unfreezing (hierarchical fine-tuning): layer groups start training on a schedule.

The body's transformer layers are cut into groups of `layers_per_group` consecutive layers.
Training starts with the task head and the first group; every `unfreeze_every_steps` steps
the next group joins, until all train:
- `top_down` (ULMFiT's gradual unfreezing, Howard & Ruder 2018): the top group first, then
  lower ones, so the general features of the lower layers are disturbed last;
- `bottom_up`: the lowest layers first (say the first three), then higher ones.

`discriminative_lr` (ULMFiT's 2.6) gives each group its own learning rate: the top group
the job's rate, each group below it that rate divided by the factor once more. The head
always trains at the job's rate. Embeddings stay frozen. Pair it with the
`reduce_on_plateau` schedule for the adaptive learning rate of the hierarchical recipe.

The schedule is a function of the step, so a resumed job unfreezes exactly the same groups.
Everything the schedule may train is saved (groups not yet unfrozen equal the base), by
parameter name, in `trained_weights.safetensors`; `load_trained` puts them back.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from peft_engine.methods.common import (
    BERT_LIKE,
    HEAD_TASKS,
    LLAMA_LIKE,
    TASK_HEAD,
    TEXT_TASKS,
    MethodSpec,
    MethodTrainer,
)
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import TRAINED_NAMES_ATTRIBUTE, TRAINED_WEIGHTS


class LayerwiseUnfreezeMethod(MethodSpec):
    type: Literal["layerwise_unfreeze"] = "layerwise_unfreeze"
    direction: Literal["top_down", "bottom_up"] = "top_down"
    layers_per_group: int = Field(1, ge=1, le=1000)
    # Steps between two groups joining; "auto": all have joined by the last group's share.
    unfreeze_every_steps: int | Literal["auto"] = Field("auto")
    # Learning-rate divisor per group down from the top (ULMFiT: 2.6); null: one rate.
    discriminative_lr: float | None = Field(None, ge=1.0, le=100.0)


def transformer_layers(model: Any) -> list[Any]:
    """The body's stack of transformer layers, bottom first: the longest ModuleList that
    has as many entries as config.num_hidden_layers."""
    from torch import nn

    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and not name.startswith(TASK_HEAD)
    ]
    matching = [s for s in stacks if wanted is None or len(s) == wanted]
    if not matching:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return list(max(matching, key=len))


def layer_groups(model: Any, spec: LayerwiseUnfreezeMethod) -> list[list[Any]]:
    """Groups of layers, in the order they are unfrozen."""
    layers = transformer_layers(model)
    size = spec.layers_per_group
    groups = [layers[i : i + size] for i in range(0, len(layers), size)]
    return groups if spec.direction == "bottom_up" else groups[::-1]


def _head_parameters(model: Any, task: str) -> list[Any]:
    if task in HEAD_TASKS:
        return list(getattr(model, TASK_HEAD).parameters())
    return []


def build_layerwise(model: Any, spec: LayerwiseUnfreezeMethod, task: str) -> Any:
    groups = layer_groups(model, spec)
    head = _head_parameters(model, task)
    trainable = {id(p) for group in groups for layer in group for p in layer.parameters()}
    trainable |= {id(p) for p in head}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    names = {name for name, p in model.named_parameters() if id(p) in trainable}
    setattr(model, TRAINED_NAMES_ATTRIBUTE, names)
    # Until the schedule says otherwise (before_step), the head and the first group train.
    for parameter in [*head, *(p for layer in groups[0] for p in layer.parameters())]:
        parameter.requires_grad_(True)
    return model


class LayerwiseTrainer(MethodTrainer):
    def __init__(self, model: Any, spec: LayerwiseUnfreezeMethod, hp: Any, task: str) -> None:
        self.model, self.spec = model, spec
        self.groups = layer_groups(model, spec)
        self.head = _head_parameters(model, task)
        n = len(self.groups)
        self.every = (
            spec.unfreeze_every_steps
            if spec.unfreeze_every_steps != "auto"
            else max(1, math.ceil(hp.total_steps / (n + 1)))
        )
        self.stage = 0

    def stage_at(self, step: int) -> int:
        """How many groups train at `step` (1-based): one at first, one more every interval."""
        return min(len(self.groups), 1 + (step - 1) // self.every)

    def before_step(self, step: int) -> None:
        stage = self.stage_at(step)
        if stage == self.stage:
            return
        for index, group in enumerate(self.groups):
            for layer in group:
                for parameter in layer.parameters():
                    parameter.requires_grad_(index < stage)
        self.stage = stage

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        factor = self.spec.discriminative_lr or 1.0
        # the depth below the top of each group decides its rate, whatever the direction
        by_depth = self.groups if self.spec.direction == "top_down" else self.groups[::-1]
        groups: list[dict[str, Any]] = []
        for depth, group in enumerate(by_depth):
            params = [p for layer in group for p in layer.parameters()]
            groups.extend(_decay_split(params, weight_decay, factor**-depth))
        groups.extend(_decay_split(self.head, weight_decay, 1.0))
        return [g for g in groups if g["params"]]


def _decay_split(params: list[Any], weight_decay: float, scale: float) -> list[dict[str, Any]]:
    return [
        {
            "params": [p for p in params if p.ndim >= 2],
            "weight_decay": weight_decay,
            "lr_scale": scale,
        },
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale},
    ]


register(
    MethodDef(
        type="layerwise_unfreeze",
        spec=LayerwiseUnfreezeMethod,
        build=build_layerwise,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 5e-5,
        weights=TRAINED_WEIGHTS,
        trainer=lambda model, spec, hp, task: LayerwiseTrainer(model, spec, hp, task),
        families=(*BERT_LIKE, "vit", *LLAMA_LIKE, "gpt2"),
    )
)
