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

`gradient_checkpointing`: true turns it on, false off. "auto" turns it on on a GPU when the
job's estimated peak without it (peft_engine/memory.py, the dry run's `memory`) is over
HEADROOM of the device's memory; on a CPU, which has the memory to spare and no time to lose,
"auto" is off. (The GPU side has not run on a GPU here: `over_device_memory` is tested with
the device's size given.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_engine.errors import SpecError
from peft_engine.memory import job_memory

if TYPE_CHECKING:
    import torch

    from peft_engine.prepare import PreparedJob

PARAM = "hyperparameters.gradient_checkpointing"
# The share of a GPU's memory the estimate may fill before "auto" recomputes: the rest is the
# CUDA context, the caching allocator's slack and what the estimate leaves out (bench/memory.py)
HEADROOM = 0.85


def wants_checkpointing(job: PreparedJob, device: torch.device) -> bool:
    """Whether the job recomputes activations: as the spec says, or for "auto" when it would
    not fit the GPU otherwise (never on a CPU; never for prefix_tuning, which cannot)."""
    setting = job.spec.hyperparameters.gradient_checkpointing
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda" or job.spec.method.type == "prefix_tuning":
        return False
    import torch

    return over_device_memory(job, torch.cuda.get_device_properties(device).total_memory)


def over_device_memory(job: PreparedJob, device_bytes: int) -> bool:
    """Whether the job's estimated peak without checkpointing is over HEADROOM of a device
    of `device_bytes` (False when the model has no estimate)."""
    hp = job.spec.hyperparameters
    longest = max((getattr(e, "n_tokens", 0) for e in job.train.examples), default=0)
    longest = longest or hp.max_seq_length
    memory = job_memory(job.model_path, job.spec, longest_sequence=longest)
    if memory is None:
        return False
    return memory["peak_bytes_by_checkpointing"]["off"] > HEADROOM * device_bytes


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
