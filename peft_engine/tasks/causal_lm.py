"""Causal language modelling: chat, prompt/completion or plain text; next-token loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from peft_engine.data.batching import Batch, collate
from peft_engine.data.tokenize import TokenizedExample, tokenize_dataset
from peft_engine.loss import batch_loss, evaluate, example_losses, token_cross_entropy
from peft_engine.tasks.base import ExampleResult, LossSum, TaskData


class CausalLMTask:
    name = "causal_lm"
    unit = "tokens"

    def prepare(
        self,
        spec: Any,
        train: Sequence[Any],
        validation: Sequence[Any],
        model_path: Path,
        *,
        max_seq_length: int,
        validation_param: str,
    ) -> TaskData:
        from peft_engine.models import load_tokenizer

        tokenizer = load_tokenizer(model_path)
        on_inputs = spec.hyperparameters.train_on_inputs
        train_set = tokenize_dataset(
            train, tokenizer, max_seq_length=max_seq_length, train_on_inputs=on_inputs
        )
        validation_set = (
            tokenize_dataset(
                validation,
                tokenizer,
                max_seq_length=max_seq_length,
                train_on_inputs=on_inputs,
                param=validation_param,
            )
            if validation
            else None
        )
        return TaskData(tokenizer, train_set, validation_set)

    def load_model(self, job: Any, *, dtype: torch.dtype, device: torch.device) -> Any:
        from peft_engine.models import load_causal_lm
        from peft_engine.models.resident import resident_loader

        if job.spec.hyperparameters.base_precision == "nf4":  # QLoRA: never the resident copy
            from transformers import AutoModelForCausalLM

            from peft_engine.quantization import load_nf4

            return load_nf4(
                AutoModelForCausalLM,
                job.model_path,
                dtype=dtype,
                device=device,
                attn_implementation="sdpa",
            )
        resident = resident_loader(job.spec.method)  # the worker's cache, when one is active
        return load_causal_lm(job.model_path, dtype=dtype, device=device, resident=resident)

    def collate(self, examples: Sequence[TokenizedExample], job: Any) -> Batch:
        hp = job.spec.hyperparameters
        return collate(examples, packing=hp.packing, pad_token_id=job.pad_token_id)

    def loss(self, model: Any, batch: Batch, job: Any) -> LossSum:
        virtual = _virtual_tokens(job)
        if virtual is None:
            return batch_loss(model, batch)
        return _prompt_learning_loss(model, batch, virtual)

    def evaluate(
        self, model: Any, batches: Iterable[Batch], device: torch.device, job: Any
    ) -> tuple[dict[str, float], dict[str, Any], list[ExampleResult]]:
        virtual = _virtual_tokens(job)
        if virtual is None:
            metrics, examples = evaluate(model, batches, device)
        else:
            loss = lambda m, b: _prompt_learning_loss(m, b, virtual)  # noqa: E731
            metrics, examples = evaluate(model, batches, device, loss=loss)
        return metrics, {}, examples

    def describe_eval(self, metrics: dict[str, float]) -> str:
        return (
            f"loss {metrics['eval_loss']:.4f}, perplexity {metrics['eval_perplexity']:.2f}, "
            f"token accuracy {metrics['eval_token_accuracy']:.3f}"
        )

    def model_info(self, job: Any) -> dict[str, Any]:
        return {"task": self.name}

    def build_model(self, base_dir: Path, info: dict[str, Any], **kwargs: Any) -> Any:
        from peft_engine.models import load_causal_lm

        # dtype=, device=, resident= as for the other tasks' bodies
        return load_causal_lm(base_dir, **kwargs)


def _virtual_tokens(job: Any) -> int | None:
    """None for ordinary methods; for prompt-learning methods, the virtual tokens that peft
    puts in front of the input and that come back as extra logits (0 for prefix tuning)."""
    return getattr(job.spec.method, "virtual_tokens_in_logits", None)


def _prompt_learning_loss(model: Any, batch: Batch, virtual: int) -> LossSum:
    # peft's prompt-learning forward takes neither position ids nor logits_to_keep; examples
    # are padded (never packed) and the virtual tokens' logits are dropped.
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    logits = out.logits[:, virtual:].float()
    loss, correct, token_losses = token_cross_entropy(logits, batch.targets, per_token=True)
    assert token_losses is not None
    examples = example_losses(batch, batch.example_of_position(), token_losses)
    return LossSum(loss, batch.n_loss_tokens, correct, examples)


CAUSAL_LM = CausalLMTask()
