"""Preference tuning of a causal LM: DPO (Rafailov et al. 2023) on preference pairs.

Each example is a prompt (`input.messages`) with a preferred and a non-preferred answer. Both
answers are rendered after the prompt with the model's chat template, and only the answer's
tokens (its content and end-of-turn token) carry loss. A batch of n pairs is one padded batch
of 2n rows (the preferred answers, then the non-preferred), run through the model at once.

The loss of a pair is DPO's: with π the trained model and π_ref the reference,

    h = [log π(yw|x) - log π_ref(yw|x)] - [log π(yl|x) - log π_ref(yl|x)]
    loss = -(1 - ε) log σ(β h) - ε log σ(-β h)

where the log-probabilities are summed over the answer's tokens and ε is the label smoothing
(conservative DPO; 0 is the paper's loss). With `sft_weight` w > 0 the preferred answer's
mean next-token loss, times w, is added. The reference model is the base model itself: the
same weights run with the adapter disabled (peft's `disable_adapter`) and without gradients,
so there is no second copy of the model; an evaluation reuses the reference's figures of
the batches an earlier one computed (they cannot change). The implicit rewards are β times
each answer's log-ratio; the metrics are their means, their margin, how often the preferred
answer's is the higher (reward accuracy), and the answers' log-probabilities.

`n_loss_tokens` of a batch is its number of pairs, so the loop's normalisation makes a
step's loss the mean over its pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F

from peft_engine.data.batching import Batch, pad
from peft_engine.data.examples import DataFormat, Example
from peft_engine.data.formats import preference_conversations
from peft_engine.data.tokenize import (
    IGNORE,
    TokenizedExample,
    token_ids_and_mask,
    truncate_and_shift,
)
from peft_engine.errors import DataError
from peft_engine.fused_loss import fused_parts, linear_cross_entropy
from peft_engine.tasks.base import Dataset, ExampleLosses, ExampleResult, LossSum, TaskData
from peft_engine.tasks.causal_lm import CAUSAL_LM


@dataclass(frozen=True)
class PreferencePair:
    """A prompt with its preferred (`chosen`) and non-preferred (`rejected`) answer."""

    line: int
    chosen: TokenizedExample
    rejected: TokenizedExample

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return 1  # the loss is a mean over pairs

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


@dataclass
class PreferenceBatch:
    """n pairs as one padded batch: rows 0..n-1 the chosen answers, n..2n-1 the rejected."""

    sequences: Batch
    n_pairs: int

    @property
    def n_tokens(self) -> int:
        return self.sequences.n_tokens

    @property
    def n_loss_tokens(self) -> int:
        return self.n_pairs

    @property
    def lines(self) -> tuple[int, ...]:
        """The pairs' file lines (rows n..2n-1 repeat rows 0..n-1's)."""
        return self.sequences.lines[: self.n_pairs]

    def to(self, device: torch.device | str) -> PreferenceBatch:
        return PreferenceBatch(self.sequences.to(device), self.n_pairs)


@dataclass(frozen=True)
class PairTerms:
    """What DPO computes for each pair of a batch (losses with their graph, the rest not)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def tokenize_pairs(
    examples: Sequence[Example], tokenizer: Any, *, max_seq_length: int, param: str
) -> Dataset:
    """Each pair's two conversations, tokenized with loss on the answer only, cut to
    `max_seq_length`; a pair with an answer left with no token to learn from is left out."""
    kept: list[PreferencePair] = []
    dropped = longest = 0
    for example in examples:
        answers = []
        for conversation in preference_conversations(example.record):
            *prompt, answer = conversation
            messages = [{**m, "weight": 0} for m in prompt] + [{**answer, "weight": 1}]
            chat = Example(example.line, DataFormat.CHAT, {"messages": messages})
            ids, mask = token_ids_and_mask(chat, tokenizer, train_on_inputs=False, param=param)
            longest = max(longest, len(ids))
            answers.append(truncate_and_shift(example.line, ids, mask, max_seq_length))
        if any(a.n_loss_tokens == 0 for a in answers):
            dropped += 1
            continue
        kept.append(PreferencePair(example.line, *answers))
    if not kept:
        raise DataError(
            f"no pair has an answer to learn from within max_seq_length={max_seq_length}",
            param=param,
        )
    truncated = sum(p.truncated for p in kept)
    return Dataset(kept, truncated=truncated, dropped=dropped, longest=longest)


def sequence_log_probs(model: Any, batch: Batch) -> torch.Tensor:
    """Each row's log-probability of its target tokens, summed (float32, shape (rows,)).

    The output layer runs on the positions where some row has a target; where the fused
    loss knows the model's output layer, one row at a time through it (no full-vocabulary
    logits kept for the backward pass).
    """
    keep = (batch.targets != IGNORE).any(dim=0).nonzero().squeeze(1)
    targets = batch.targets[:, keep]
    inputs = {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }
    parts = fused_parts(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, keep]
        losses = [
            linear_cross_entropy(row, head.weight, row_targets, IGNORE)[0]
            for row, row_targets in zip(hidden, targets, strict=True)
        ]
        return -torch.stack(losses)
    logits = model(**inputs, logits_to_keep=keep).logits.float()
    token_losses = F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return -token_losses.view(targets.shape).sum(dim=1)


def reference_log_probs(model: Any, batch: PreferenceBatch) -> torch.Tensor:
    """The reference model's log-probabilities of the batch's answers: the base model, which
    is `model` with its adapter disabled, without gradients."""
    with torch.no_grad(), model.disable_adapter():
        return sequence_log_probs(model, batch.sequences)


def pair_terms(
    model: Any, batch: PreferenceBatch, objective: Any, reference: torch.Tensor | None = None
) -> PairTerms:
    """DPO's loss and rewards for each pair; `reference` (computed when not given) holds the
    reference model's log-probabilities of the answers."""
    n = batch.n_pairs
    policy = sequence_log_probs(model, batch.sequences)
    if reference is None:
        reference = reference_log_probs(model, batch)
    chosen_ratio = policy[:n] - reference[:n]
    rejected_ratio = policy[n:] - reference[n:]
    h = objective.beta * (chosen_ratio - rejected_ratio)
    smoothing = objective.label_smoothing
    losses = -(1 - smoothing) * F.logsigmoid(h) - smoothing * F.logsigmoid(-h)
    if objective.sft_weight:
        chosen_tokens = (batch.sequences.targets[:n] != IGNORE).sum(dim=1)
        losses = losses - objective.sft_weight * policy[:n] / chosen_tokens
    return PairTerms(
        losses=losses,
        chosen_rewards=objective.beta * chosen_ratio.detach(),
        rejected_rewards=objective.beta * rejected_ratio.detach(),
        chosen_logps=policy[:n].detach(),
        rejected_logps=policy[n:].detach(),
    )


# The reference's log-probabilities of each evaluated batch (by its content), per model:
# only the adapter trains, so the base model's never change during a run, and each
# evaluation after the first runs the model once a batch instead of twice.
_EVAL_REFERENCE: WeakKeyDictionary[Any, dict[str, torch.Tensor]] = WeakKeyDictionary()


def _batch_key(batch: PreferenceBatch) -> str:
    """What identifies a batch's reference figures: its tokens and targets, exactly."""
    digest = hashlib.sha256()
    for tensor in (batch.sequences.input_ids, batch.sequences.targets):
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.cpu().numpy().tobytes())
    return digest.hexdigest()


_TERMS = ("losses", "chosen_rewards", "rejected_rewards", "chosen_logps", "rejected_logps")


class PreferenceTask:
    name = "preference"
    unit = "pairs"

    def prepare(
        self,
        spec: Any,
        train: Sequence[Example],
        validation: Sequence[Example],
        model_path: Path,
        *,
        max_seq_length: int,
        validation_param: str,
    ) -> TaskData:
        from peft_engine.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        train_set = tokenize_pairs(
            train, tokenizer, max_seq_length=max_seq_length, param="training_file"
        )
        validation_set = (
            tokenize_pairs(
                validation, tokenizer, max_seq_length=max_seq_length, param=validation_param
            )
            if validation
            else None
        )
        return TaskData(tokenizer, train_set, validation_set)

    def load_model(self, job: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
        return CAUSAL_LM.load_model(job, dtype=dtype, device=device)

    def collate(self, examples: Sequence[PreferencePair], job: Any) -> PreferenceBatch:
        rows = [p.chosen for p in examples] + [p.rejected for p in examples]
        return PreferenceBatch(pad(rows, job.pad_token_id), len(examples))

    def loss(self, model: Any, batch: PreferenceBatch, job: Any) -> LossSum:
        terms = pair_terms(model, batch, job.spec.method.objective)
        correct = int((terms.chosen_rewards > terms.rejected_rewards).sum())
        per_pair = ExampleLosses(batch.lines, terms.losses.detach().float(), (1,) * batch.n_pairs)
        return LossSum(terms.losses.sum(), batch.n_pairs, correct, per_pair)

    @torch.no_grad()
    def evaluate(
        self, model: Any, batches: Iterable[PreferenceBatch], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
        was_training = model.training
        model.eval()
        objective = job.spec.method.objective
        known = _EVAL_REFERENCE.setdefault(model, {})
        parts, lines = [], []
        for batch in batches:
            key = _batch_key(batch)
            batch = batch.to(device)
            if key not in known:
                known[key] = reference_log_probs(model, batch)
            parts.append(pair_terms(model, batch, objective, known[key]))
            lines.extend(batch.lines)
        model.train(was_training)
        every = {name: torch.cat([getattr(p, name) for p in parts]).float() for name in _TERMS}
        chosen, rejected = every["chosen_rewards"].mean(), every["rejected_rewards"].mean()
        logps_chosen, logps_rejected = every["chosen_logps"].mean(), every["rejected_logps"].mean()
        accurate = every["chosen_rewards"] > every["rejected_rewards"]
        metrics = {
            "eval_loss": float(every["losses"].mean()),
            "eval_reward_accuracy": float(accurate.float().mean()),
            "eval_reward_margin": float(chosen - rejected),
            "eval_reward_chosen": float(chosen),
            "eval_reward_rejected": float(rejected),
            "eval_logps_chosen": float(logps_chosen),
            "eval_logps_rejected": float(logps_rejected),
            "eval_logps_margin": float(logps_chosen - logps_rejected),
        }
        # per pair: its DPO loss (diagnostics name the pairs the model gets most wrong)
        examples = [
            ExampleResult(line=line, loss=float(loss), n_items=1)
            for line, loss in zip(lines, every["losses"].tolist(), strict=True)
        ]
        return metrics, {}, examples

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, reward accuracy "
            f"{metrics['eval_reward_accuracy']:.3f}, reward margin "
            f"{metrics['eval_reward_margin']:.4f}, log-prob margin "
            f"{metrics['eval_logps_margin']:.2f}"
        )

    def model_info(self, job: Any) -> dict[str, Any]:
        return CAUSAL_LM.model_info(job)  # the trained model is a causal LM like any other

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any:
        return CAUSAL_LM.build_model(base_dir, info, **kwargs)


PREFERENCE = PreferenceTask()
