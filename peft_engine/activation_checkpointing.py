"""Gradient checkpointing: keep each transformer layer's input in the forward pass, and
recompute the layer's activations in the backward pass instead of keeping them.

Activation memory drops from every layer's intermediate tensors to one layer's at a time
(plus each layer's input), for the cost of about one more forward pass. The result does not
change: the recomputation replays the same operations on the same inputs, with the random
state restored (torch.utils.checkpoint's `preserve_rng_state`), so LoRA's dropout masks are
the same ones (tests/test_gradient_checkpointing.py holds losses and gradients to a run
without it).

It is transformers' own, non-reentrant (`use_reentrant=False`): that variant tracks the
parameters inside a checkpointed layer whether or not its input requires a gradient, so an
adapter under frozen embeddings gets its gradients without peft's `enable_input_require_grads`
hook (transformers adds that hook anyway for models fed `input_ids`; it is harmless).

`gradient_checkpointing`: true turns it on, false off. "auto" is off: it should turn it on
on a GPU when the job's estimated activation memory would not fit, and the engine has no
per-job memory estimate yet (issue 19's memory estimate will give one); a CPU has the
memory to spare and the time to lose, so "auto" stays off there in any case.
"""

from __future__ import annotations

from typing import Any

from peft_engine.errors import SpecError

PARAM = "hyperparameters.gradient_checkpointing"


def wants_checkpointing(setting: bool | str) -> bool:
    """Whether a job recomputes activations: true, or never for "auto" (see the module)."""
    return setting is True


def enable_gradient_checkpointing(model: Any, method_type: str) -> None:
    """Turn checkpointing on in the transformers model inside `model` (a peft model, a task
    head around a body, or the model itself); a SpecError when it cannot be."""
    if method_type == "prefix_tuning":
        # peft hands the prefix to every layer as a key/value cache, which it refuses to
        # combine with checkpointing
        raise SpecError(
            "prefix_tuning cannot be combined with gradient checkpointing; set it to false",
            param=PARAM,
        )
    body = _transformers_model(model)
    if body is None or not getattr(body, "supports_gradient_checkpointing", False):
        name = type(body or model).__name__
        raise SpecError(f"{name} cannot recompute its layers; set it to false", param=PARAM)
    # newer transformers call it activation checkpointing (the old name warns); older
    # releases within the pins may have the old name only
    enable = getattr(body, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _transformers_model(model: Any) -> Any:
    """The outermost transformers model in `model` (modules() lists a parent first)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
