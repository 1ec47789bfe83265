"""The optimizer of a run: AdamW over what the method trains, in groups by decay and rate.

Biases and norm scales take no weight decay, as usual; a method may bring its own groups
(discriminative rates for layer-wise unfreezing); the task head, when it has a rate of its
own (`head_learning_rate`), goes in groups apart at that rate.
"""

from __future__ import annotations

from typing import Any

import torch

from peft_engine.methods.common import TASK_HEAD, MethodTrainer


def build_optimizer(model: Any, method_trainer: MethodTrainer, hp: Any) -> torch.optim.AdamW:
    groups = method_trainer.param_groups(hp.weight_decay) or param_groups(model, hp.weight_decay)
    if hp.head_learning_rate is not None:
        groups = head_apart(model, groups, hp.head_learning_rate / hp.learning_rate)
    for group in groups:  # a group's lr_scale (discriminative learning rates) scales the peak
        group["lr"] = hp.learning_rate * group.get("lr_scale", 1.0)
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.999))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases and norm scales, as usual.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def head_apart(model: Any, groups: list[dict[str, Any]], scale: float) -> list[dict[str, Any]]:
    """`groups` with the task head's parameters in groups of their own, at `scale` times the
    peak rate (in place of any scale their group had)."""
    head = {
        id(param)
        for name, param in model.named_parameters()
        if param.requires_grad and TASK_HEAD in name.split(".")
    }
    body_groups, head_groups = [], []
    for group in groups:
        params = list(group["params"])
        options = {k: v for k, v in group.items() if k != "params"}
        body = [p for p in params if id(p) not in head]
        if body:
            body_groups.append({**options, "params": body})
        if len(body) < len(params):
            head_params = [p for p in params if id(p) in head]
            head_groups.append({**options, "params": head_params, "lr_scale": scale})
    return body_groups + head_groups
