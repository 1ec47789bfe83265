"""Micro-batches: packed without padding, or padded per batch; and the data order.

Packing puts a micro-batch's examples side by side in one row. Each example's position ids
start again at 0, which transformers reads as sequence boundaries: attention stays inside
each example (a block-diagonal causal mask), exactly as if each had been run alone, and no
token is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peft_engine.data.tokenize import IGNORE, TokenizedExample


@dataclass
class Batch:
    input_ids: torch.Tensor  # (rows, length)
    targets: torch.Tensor  # (rows, length), IGNORE where no loss
    position_ids: torch.Tensor  # (rows, length)
    attention_mask: torch.Tensor | None  # None when packed: boundaries come from position ids
    n_tokens: int  # real tokens, padding excluded
    n_loss_tokens: int
    # Packed rows: where each example starts and ends ([0, len0, len0 + len1, ...]), kept on
    # the CPU (the attention reads it as Python ints); None when padded.
    cu_seqlens: torch.Tensor | None = None
    # The examples' file lines and loss tokens, in the order they sit in the batch.
    lines: tuple[int, ...] = ()
    example_loss_tokens: tuple[int, ...] = ()

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.targets),
            move(self.position_ids),
            move(self.attention_mask),
            self.n_tokens,
            self.n_loss_tokens,
            self.cu_seqlens,
            self.lines,
            self.example_loss_tokens,
        )

    def example_of_position(self) -> torch.Tensor:
        """(rows, length): the index of the example each position belongs to."""
        rows, length = self.input_ids.shape
        if self.cu_seqlens is None:  # padded: a row is an example
            return torch.arange(rows)[:, None].expand(rows, length)
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]

    @property
    def longest(self) -> int:
        """The longest example's length (a packed row's segments, or the padded width)."""
        if self.cu_seqlens is None:
            return self.input_ids.shape[1]
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())


def collate(examples: Sequence[TokenizedExample], *, packing: bool, pad_token_id: int) -> Batch:
    return pack(examples) if packing else pad(examples, pad_token_id)


def pack(examples: Sequence[TokenizedExample]) -> Batch:
    input_ids = [t for e in examples for t in e.input_ids]
    targets = [t for e in examples for t in e.targets]
    positions = [p for e in examples for p in range(len(e.input_ids))]
    lengths = torch.tensor([0, *(len(e.input_ids) for e in examples)])
    return Batch(
        input_ids=torch.tensor([input_ids]),
        targets=torch.tensor([targets]),
        position_ids=torch.tensor([positions]),
        attention_mask=None,
        n_tokens=len(input_ids),
        n_loss_tokens=sum(t != IGNORE for t in targets),
        cu_seqlens=torch.cumsum(lengths, 0, dtype=torch.int32),
        lines=tuple(e.line for e in examples),
        example_loss_tokens=tuple(e.n_loss_tokens for e in examples),
    )


def pad(examples: Sequence[TokenizedExample], pad_token_id: int) -> Batch:
    length = max(len(e.input_ids) for e in examples)
    rows = len(examples)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    targets = torch.full((rows, length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        targets[row, :n] = torch.tensor(example.targets)
        attention_mask[row, :n] = 1
    return Batch(
        input_ids=input_ids,
        targets=targets,
        position_ids=torch.arange(length).expand(rows, length).clone(),
        attention_mask=attention_mask,
        n_tokens=int(attention_mask.sum()),
        n_loss_tokens=int((targets != IGNORE).sum()),
        lines=tuple(e.line for e in examples),
        example_loss_tokens=tuple(e.n_loss_tokens for e in examples),
    )


def epoch_order(n_examples: int, *, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch) alone.

    Deriving it from the seed rather than from a running generator makes the data order
    part of the resume state for free: a checkpoint needs only the epoch and the position.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def micro_batches(
    examples: Sequence[TokenizedExample], order: Sequence[int], batch_size: int
) -> list[list[TokenizedExample]]:
    return [
        [examples[i] for i in order[start : start + batch_size]]
        for start in range(0, len(order), batch_size)
    ]
