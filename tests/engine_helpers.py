"""Helpers of the engine's tests on the tiny Llama: tokenised chat examples, the model
under `sdpa`, LoRA weights that make every gradient count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peft_engine import Hooks
from peft_engine.data.formats import DataFormat, Example
from peft_engine.data.tokenize import IGNORE, tokenize_dataset
from peft_engine.models.attention import use_packed_attention
from tests.conftest import chat

ROWS = [
    chat("What is 2 plus 2?", "4."),
    chat("Hello! How are you today?", "I am fine, thank you, and you?"),
    chat("Capital of France?", "Paris is the capital of France."),
    chat("Name a colour.", "Blue, like the sky on a clear day in June."),
]


def tokenized_chat_examples(tokenizer):
    """Four chat examples of different lengths, tokenised for the tiny Llama."""
    rows = [Example(i + 1, DataFormat.CHAT, r) for i, r in enumerate(ROWS)]
    return tokenize_dataset(rows, tokenizer, max_seq_length=256, train_on_inputs=False).examples


def sdpa_llama(tiny_model_dir, packed: bool):
    """The tiny Llama under `sdpa`; with `packed`, checked to take the packed-attention path."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    if packed:
        assert use_packed_attention(model)
    return model


def randomise_lora_b(model):
    """LoRA B starts at zero, which would leave LoRA A's gradient zero: make it count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


def batch_logits(model, batch, **kwargs):
    """The model's logits for a packed or padded batch."""
    return model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        **kwargs,
    ).logits


def token_losses(logits, batch):
    """Each target token's cross-entropy (0 where ignored), shaped like the batch's targets."""
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(batch.targets.shape)


def stop_after(steps: int) -> Hooks:
    """Hooks that stop a run once it has trained `steps` steps, as a worker told to stop
    does: the run checkpoints there and ends "stopped", to be resumed."""
    trained: list[int] = []
    return Hooks(
        on_metrics=lambda step, m: trained.append(step) if "train_loss" in m else None,
        should_stop=lambda: len(trained) >= steps,
    )
