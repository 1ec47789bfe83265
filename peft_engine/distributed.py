"""One job across several processes: data parallel under torchrun (`resources.gpus`).

Every rank builds the same model from the same seed, so the weights start equal; each
optimizer step's examples are split across the ranks (`shard`), each rank runs forward and
backward on its share with the loss divided by the whole step's loss tokens (summed over the
ranks first), and one coalesced all_reduce sums the trained parameters' gradients
(`reduce_gradients`). Every rank then holds the gradient a single process would have
computed for the whole step, and clips and steps identically, so the weights stay equal
without ever being sent. This is what DistributedDataParallel does, without overlapping the
reduction with the backward pass: an adapter's gradient is a few MB, one reduction per step
costs little next to the step, and the engine's loss paths (a fused cross-entropy on the
body's hidden states) need the bare model, not DDP's wrapper.

Decisions that must agree go through `any_` (stop on request, the time limit); everything
else each rank computes the same way from the same numbers, evaluation included (every
rank evaluates the whole set: equal weights, equal figures, equal early-stopping choices).
Rank 0 alone reports, writes checkpoints and writes the output (`is_main`).

Under torchrun the backend is NCCL on CUDA (each rank on the GPU of its LOCAL_RANK) and gloo
on a CPU, where tests run two ranks.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# A collective waits this long for a rank that is still busy (rank 0 evaluating the whole
# validation set, writing a large checkpoint) before the group gives up.
COLLECTIVE_TIMEOUT = dt.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place among the job's ranks; the single-process world by default."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, groups: list[list[Any]], *, whole_step: bool) -> list[list[Any]]:
        """This rank's share of a step's micro-batches. `whole_step` (a loss summed over
        examples, cut by tokens afterwards): every size-th example of the whole step, in one
        group, so each rank gets its share however small the micro-batches; otherwise every
        size-th example of each micro-batch (a batch-norm body sees a part of each), where a
        micro-batch smaller than the ranks leaves some without a share of it."""
        if not self.active:
            return groups
        if whole_step:
            examples = [example for group in groups for example in group]
            return [share] if (share := examples[self.rank :: self.size]) else []
        shares = [group[self.rank :: self.size] for group in groups]
        return [share for share in shares if share]

    def sum_(self, values: Iterable[float]) -> list[float]:
        """`values` summed over the ranks (float64: token counts stay exact)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max_(self, values: Iterable[float]) -> list[float]:
        """`values`, each the largest over the ranks."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values: Iterable[float], op: Any) -> list[float]:
        values = list(values)
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    def any_(self, flag: bool) -> bool:
        """True on every rank when it is true on any: a stop every rank takes at the same step."""
        if not self.active:
            return flag
        tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self._device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in one buffer per dtype."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for param in params:
            if param.grad is None:  # no share of this step touched it: it contributes zeros
                param.grad = torch.zeros_like(param)
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for grad in grads:
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def _device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), its
    process group started; the single-process world when there is none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return World(rank=rank, size=size, local_rank=local_rank)


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
