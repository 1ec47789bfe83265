"""What a task brings to the training loop: its data, its model, its loss and its metrics.

The loop (`peft_engine.training`) is the same for every task; a `Task` supplies the parts
that differ:

    prepare   examples → the tokenized (or decoded) datasets, the label set, the processor
    load_model          → the base model with the task's head (the loop applies the method)
    collate   examples → a batch (`n_tokens` and `n_loss_tokens` for the loop's accounting)
    loss      (model, batch) → summed loss, the number of items it is summed over, and
                        the loss of each of the batch's examples (for diagnostics)
    evaluate  (model, batches) → flat metrics (for the metrics series), a report, and
                        each validation example's result (peft_engine.diagnostics)

`n_loss_tokens` counts what the loss is averaged over: next-token targets for causal LM,
examples for sequence classification, labelled words for token classification.

These types live apart from `task_for`, which imports the task modules, so that the task
modules and the loop import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    import torch

    from peft_engine.data.formats import Example
    from peft_engine.prepare import PreparedJob
    from peft_engine.spec import JobSpec


@dataclass(frozen=True)
class Dataset:
    """A task's prepared examples and what the loop and the report need to know of them."""

    examples: list[Any]  # each has .line and .input_ids (or an image) and its label(s)
    truncated: int = 0  # examples cut to max_seq_length (still trained on)
    dropped: int = 0  # examples left with nothing to learn from (not trained on)
    longest: int = 0  # longest example in tokens, before truncation

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.examples)

    @property
    def n_loss_tokens(self) -> int:
        return sum(e.n_loss_tokens for e in self.examples)


@dataclass(frozen=True)
class TaskData:
    processor: Any  # the tokenizer or image processor, saved with the output
    train: Any  # peft_engine.data.tokenize.TokenizedDataset or Dataset
    validation: Any | None
    labels: tuple[str, ...] | None = None  # class or tag names, in id order
    options: dict[str, Any] = field(default_factory=dict)  # resolved task options


@dataclass(frozen=True)
class ExampleLosses:
    """A batch's loss per example, in the batch's example order: each summed over the
    example's items (target tokens, labelled words; one for a label or an image)."""

    lines: tuple[int, ...]
    loss: torch.Tensor  # (examples,) float32, detached; sums to the batch's loss
    n_items: tuple[int, ...]

    @classmethod
    def from_items(
        cls,
        lines: Sequence[int],
        n_items: Sequence[int],
        owner: torch.Tensor,
        item_losses: torch.Tensor,
    ) -> ExampleLosses:
        """Sum item losses into their examples: `owner[i]` is item i's example index (a
        segment sum of losses already computed; no extra forward)."""
        import torch

        sums = torch.zeros(len(lines), dtype=torch.float32, device=item_losses.device)
        sums.index_add_(0, owner.to(item_losses.device), item_losses.detach().float())
        return cls(tuple(lines), sums, tuple(n_items))


@dataclass(frozen=True)
class ExampleResult:
    """One validation example as an evaluation saw it."""

    line: int
    loss: float  # summed over its items
    n_items: int
    gold: str | None = None  # one-label tasks: the gold and the predicted label
    predicted: str | None = None
    mistakes: tuple[tuple[str, str], ...] = ()  # (gold, predicted) of each wrong label


@dataclass
class LossSum:
    loss: torch.Tensor  # summed over the items that carry loss (a graph when training)
    n_loss_tokens: int
    n_correct: int
    examples: ExampleLosses | None = None  # the same loss, per example


class Task(Protocol):
    name: str
    # What "loss tokens" are called in messages: "tokens", "examples", "words", "images".
    unit: str

    def prepare(
        self,
        spec: JobSpec,
        train: Sequence[Example],
        validation: Sequence[Example],
        model_path: Path,
        *,
        max_seq_length: int,
        validation_param: str,
    ) -> TaskData: ...

    def load_model(
        self, job: PreparedJob, *, dtype: torch.dtype, device: torch.device
    ) -> torch.nn.Module: ...

    def collate(self, examples: Sequence[Any], job: PreparedJob) -> Any: ...

    def loss(self, model: Any, batch: Any, job: PreparedJob) -> LossSum: ...

    def evaluate(
        self, model: Any, batches: Iterable[Any], device: torch.device, job: PreparedJob
    ) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]: ...

    def describe_eval(self, metrics: dict[str, float]) -> str: ...

    def model_info(self, job: PreparedJob) -> dict[str, Any]: ...

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any: ...
