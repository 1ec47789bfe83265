"""The micro-batches of an optimizer step, fixed by the seed and the step's number alone.

A resumed run finds the same examples in step N as an uninterrupted one, because the data
order of each epoch comes from (seed, epoch) and a step's place in its epoch from its number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peft_engine.data.batching import epoch_order, micro_batches
from peft_engine.distributed import SINGLE, World

if TYPE_CHECKING:
    from peft_engine.prepare import PreparedJob
    from peft_engine.tasks.base import Task


# Tasks whose loss is a sum over whole examples, with no batch statistics: a micro-batch
# cut into pieces gives the same step (the loop divides by the step's loss items).
CUT_BY_TOKENS = ("causal_lm", "preference")


def step_micro_batches(
    job: PreparedJob,
    step: int,
    task: Task,
    *,
    tokens_per_forward: int | None = None,
    world: World = SINGLE,
) -> list[Any]:
    """The micro-batches of optimizer step `step` (1-based), fixed by seed and step alone.

    With `tokens_per_forward`, a causal-LM micro-batch is cut into consecutive runs of
    whole examples of at most that many tokens (an example longer than it goes alone; a
    preference pair counts both its answers). Other tasks are not cut: a batch-norm body
    sees the batch it was configured with. Under several ranks each takes its share of every
    micro-batch (`World.shard`) before the cut.
    """
    hp = job.spec.hyperparameters
    epoch, index_in_epoch = divmod(step - 1, hp.steps_per_epoch)
    examples = job.train.examples
    order = epoch_order(len(examples), seed=hp.seed, epoch=epoch)
    groups = micro_batches(examples, order, hp.batch_size)
    first = index_in_epoch * hp.gradient_accumulation_steps
    cut = task.name in CUT_BY_TOKENS
    groups = world.shard(groups[first : first + hp.gradient_accumulation_steps], whole_step=cut)
    if tokens_per_forward and cut:
        groups = [piece for group in groups for piece in split_by_tokens(group, tokens_per_forward)]
    return [task.collate(group, job) for group in groups]


def split_by_tokens(examples: list[Any], budget: int) -> list[list[Any]]:
    """Consecutive runs of examples whose lengths add up to at most `budget` tokens."""
    pieces: list[list[Any]] = []
    current: list[Any] = []
    tokens = 0
    for example in examples:
        length = example.n_tokens
        if current and tokens + length > budget:
            pieces.append(current)
            current, tokens = [], 0
        current.append(example)
        tokens += length
    if current:
        pieces.append(current)
    return pieces
