"""Full fine-tuning across ranks: the model sharded with FSDP2 (`fully_shard`).

Data parallel (distributed.py) keeps a whole copy of the model, its gradients and AdamW's two
moments on every rank: 16 bytes a parameter, which a full fine-tune of a large base cannot
afford. For `method: full` on several ranks the model is sharded instead: each of the
model's repeated blocks (the classes transformers names in `_no_split_modules`, e.g.
LlamaDecoderLayer) and then the whole model go through `fully_shard`, so every parameter,
its gradient and its optimizer state live as a 1/N shard on each rank; a block's weights
are gathered for its forward and backward and freed after. FSDP reduce-scatters the
gradients itself (summed: the loss is already divided by the whole step's tokens).

What changes for the loop, and is done here:
- every rank must run the same number of forward passes (each gathers weights from all):
  a rank with fewer micro-batches in a step runs extra passes whose loss counts zero
  (`padded_micro_batches`);
- the model's weights and the optimizer's state are read and written whole at the
  checkpoint, output and best-weights boundaries (`ShardedWeights`, `ShardedOptimizer`):
  every rank takes part in the gather, rank 0 alone gets the tensors (on the CPU) and writes
  them, in the same files as a single process: checkpoints move between 1 and N ranks;
- the fused loss (which reads the output layer's weight directly) is off: a sharded weight
  is only whole inside its module's forward (fused_loss.fused_parts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from peft_engine.distributed import World
from peft_engine.methods.weights import WeightsFormat


def wants_sharding(method_type: str, world: World) -> bool:
    """FSDP for full fine-tuning on several ranks; adapters stay data parallel (a whole
    copy of an adapter's few MB is cheaper than gathering it every forward)."""
    return world.active and method_type == "full"


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, device: torch.device, world: World) -> None:
    """`fully_shard` each repeated block, then the whole model (the embeddings, the final
    norm and the head are the root's); gradients summed over the ranks, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain sums: gloo has no PREMUL_SUM


def padded_micro_batches(
    micro: list[Any], world: World, any_batch: Callable[[], Any]
) -> list[tuple[Any, bool]]:
    """(micro-batch, counts) for each forward pass of this rank in a step: its own, then
    passes that count zero until it has as many as the busiest rank (on a repeat of its
    last one, or on `any_batch()` of the step when it has no share of the step at all)."""
    most = int(world.max_([len(micro)])[0])
    filler = micro[-1] if micro else (any_batch() if most else None)
    return [(batch, True) for batch in micro] + [(filler, False)] * (most - len(micro))


def grad_norm_value(norm: torch.Tensor) -> torch.Tensor:
    """The whole gradient's norm: clip_grad_norm_ over shards gives a replicated DTensor."""
    from torch.distributed.tensor import DTensor

    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathered_state(model: torch.nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The model's whole tensors named in `names`, on rank 0's CPU ({} on the other ranks);
    every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(cpu_offload=True))
    return {name: tensor for name, tensor in full.items() if name in names}


@dataclass(frozen=True)
class ShardedWeights:
    """A method's weights format over a sharded model: the same files, read and written
    whole (every rank calls; rank 0 holds the tensors and writes)."""

    inner: WeightsFormat
    world: World

    def format(self) -> WeightsFormat:
        return replace(self.inner, state=self.state, restore=self.restore, save=self.save,
                       export=None)  # fmt: skip

    def names(self, model: Any) -> set[str]:
        return set(self.inner.state(model))  # names only: the values are shards

    def state(self, model: Any) -> dict[str, torch.Tensor]:
        return gathered_state(model, self.names(model))

    def restore(self, model: Any, weights: dict[str, Any]) -> None:
        """Every rank calls, with the weights read from a file (each has them) or with a
        snapshot `state` took (rank 0 alone has it, and sends it): each keeps its shard."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from_rank0 = self.world.any_(not weights)
        options = _options(strict=False, broadcast_from_rank0=from_rank0)
        set_model_state_dict(model, dict(weights), options=options)

    def save(self, model: Any, directory: Path) -> None:
        tensors = self.state(model)
        if self.world.is_main:
            write_trained(tensors, directory)

    def saving(self, tensors: dict[str, torch.Tensor]) -> WeightsFormat:
        """The format that writes the already gathered `tensors` (rank 0, after the gather)."""
        return replace(self.inner, save=lambda _model, d: write_trained(tensors, d), export=None)


def write_trained(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    from peft_engine.methods.weights import write_trained_weights

    write_trained_weights({name: t.contiguous() for name, t in tensors.items()}, directory)


class ShardedOptimizer:
    """AdamW over a sharded model, its state read and written whole and keyed as a single
    process keys it (by each parameter's place in the groups), so checkpoint files are the
    same whatever the number of ranks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        names = {id(p): n for n, p in model.named_parameters()}
        self.order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]

    def state_dict(self) -> dict[str, Any]:
        """Every rank calls; rank 0 gets the whole state (the others an empty one)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        full = get_optimizer_state_dict(self.model, self.optimizer,
                                        options=_options(cpu_offload=True))  # fmt: skip
        index = {name: i for i, name in enumerate(self.order)}
        state = {index[name]: value for name, value in full.get("state", {}).items()}
        groups = [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in full.get("param_groups", [])
        ]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """From a whole state keyed by place, on every rank: each keeps its shard."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {self.order[i]: value for i, value in state_dict["state"].items()}
        groups = [
            {**group, "params": [self.order[i] for i in group["params"]]}
            for group in state_dict["param_groups"]
        ]
        set_optimizer_state_dict(self.model, self.optimizer,
                                 {"state": state, "param_groups": groups},
                                 options=_options(strict=False))  # fmt: skip


@dataclass(frozen=True)
class GatheredOptimizer:
    """The optimizer's whole state, gathered onto rank 0, as checkpoint.py reads it."""

    whole: dict[str, Any]

    def state_dict(self) -> dict[str, Any]:
        return self.whole
