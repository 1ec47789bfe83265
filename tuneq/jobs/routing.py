"""Routing by memory: a job goes to the smallest GPU queue whose device memory holds the
job's estimated peak (peft_engine/memory.py), when the deployment lists its GPU queues
(TUNEQ_GPU_QUEUE_MEMORY_GIB); a job that fits none is refused at submit with the numbers.
A job whose gradient_checkpointing is "auto" fits where it fits with checkpointing, which
the worker then turns on when the device needs it.

Without that setting, or without an estimate (a GGUF model not yet converted, an image
task), the job goes to its model's registry queue, as before.
"""

from __future__ import annotations

from typing import Any

from tuneq.errors import ErrorItem, InsufficientGpuMemory

GIB = 2**30
CHECKPOINTING = "hyperparameters.gradient_checkpointing"


def queue_for(
    queues_gib: dict[str, float] | None,
    registry_queue: str,
    memory: dict[str, Any] | None,
    *,
    auto_checkpointing: bool = False,
) -> str:
    """The queue a job is published to (see the module docstring). With
    `auto_checkpointing` (gradient_checkpointing "auto", a method that can) the job's need is
    its peak with checkpointing: on a GPU too small for it without, the worker turns it on
    (peft_engine/activation_checkpointing.py)."""
    if not queues_gib or memory is None:
        return registry_queue
    by_checkpointing = memory["peak_bytes_by_checkpointing"]
    need = by_checkpointing["on"] if auto_checkpointing else memory["peak_bytes"]
    fitting = [(gib, name) for name, gib in queues_gib.items() if gib * GIB >= need]
    if fitting:
        return min(fitting)[1]
    raise _too_large(queues_gib, memory)


def _too_large(queues_gib: dict[str, float], memory: dict[str, Any]) -> InsufficientGpuMemory:
    largest_gib, largest = max((gib, name) for name, gib in queues_gib.items())
    with_checkpointing = memory["peak_bytes_by_checkpointing"]["on"]
    parts = ", ".join(
        f"{name} {size(memory[f'{name}_bytes'])}"
        for name in ("weights", "trained_state", "activations")
    )
    detail = (
        f"the job needs an estimated {size(memory['peak_bytes'])} ({parts}; "
        f"{memory['tokens_per_forward']} tokens a forward pass, {memory['compute_dtype']}"
        f"{', the base in nf4' if memory.get('base_precision') == 'nf4' else ''}), "
        f"more than the largest GPU queue, {largest}, has: {size(largest_gib * GIB)}"
    )
    param = "model"
    if not memory["gradient_checkpointing"] and with_checkpointing <= largest_gib * GIB:
        detail += f"; with gradient_checkpointing true it needs {size(with_checkpointing)}"
        param = CHECKPOINTING
    else:
        detail += "; a smaller batch_size or max_seq_length, or a smaller model, needs less"
    return InsufficientGpuMemory(
        detail,
        errors=[ErrorItem(detail, field=param)],
        param=param,
        extra={
            "peak_bytes": memory["peak_bytes"],
            "queue_memory_bytes": {name: int(gib * GIB) for name, gib in queues_gib.items()},
        },
    )


def size(n_bytes: float) -> str:
    """Bytes as people read them: GiB from 1 GiB up, else MiB."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"
