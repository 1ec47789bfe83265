"""Prompt learning: trained virtual tokens in front of the input, the model frozen.

- `prompt_tuning` (Lester et al. 2021): `num_virtual_tokens` trained input embeddings;
- `p_tuning` (Liu et al. 2021): the virtual tokens come from a small trained encoder (an MLP
  or LSTM), which trains more stably than free embeddings;
- `prefix_tuning` (Li & Liang 2021): trained keys and values in front of every layer's
  attention (P-Tuning v2 for encoders), optionally through a reparameterising MLP.

peft implements all three for causal LM, sequence and token classification; a
classification head trains with them (peft's modules_to_save). Virtual tokens cannot share
a packed row, so these methods train on padded batches (the spec's `packing` resolves to
false). The output is a PEFT adapter.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peft_engine.methods.common import TEXT_TASKS, PeftMethodSpec, build_peft
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import PEFT_ADAPTER, PROMPT_ENCODER_ADAPTER


class PromptTuningMethod(PeftMethodSpec):
    peft_config = "PromptTuningConfig"
    peft_fields = {"num_virtual_tokens": "num_virtual_tokens"}

    type: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1, le=1024)

    @property
    def virtual_tokens_in_logits(self) -> int:
        return self.num_virtual_tokens


class PTuningMethod(PeftMethodSpec):
    peft_config = "PromptEncoderConfig"
    peft_fields = {
        "num_virtual_tokens": "num_virtual_tokens",
        "encoder_hidden_size": "encoder_hidden_size",
        "encoder_reparameterization_type": "encoder_type",
    }

    type: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    encoder_hidden_size: int = Field(128, ge=1, le=16384)
    encoder_type: Literal["MLP", "LSTM"] = "MLP"

    @property
    def virtual_tokens_in_logits(self) -> int:
        return self.num_virtual_tokens


class PrefixTuningMethod(PeftMethodSpec):
    peft_config = "PrefixTuningConfig"
    peft_fields = {
        "num_virtual_tokens": "num_virtual_tokens",
        "prefix_projection": "prefix_projection",
        "encoder_hidden_size": "encoder_hidden_size",
    }

    type: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1, le=1024)
    # Train the prefixes through an MLP (more stable, more parameters while training).
    prefix_projection: bool = False
    encoder_hidden_size: int = Field(128, ge=1, le=16384)

    @property
    def virtual_tokens_in_logits(self) -> int:
        return 0  # prefixes live in the attention's keys and values, not in the sequence


# p-tuning's encoder and prefix tuning's (optional) projection are trained but not in
# peft's adapter, which holds their output: checkpoints keep the parameters themselves.
for _spec, _lr, _weights in (
    (PromptTuningMethod, 1e-2, PEFT_ADAPTER),
    (PTuningMethod, 5e-3, PROMPT_ENCODER_ADAPTER),
    (PrefixTuningMethod, 5e-3, PROMPT_ENCODER_ADAPTER),
):
    register(
        MethodDef(
            type=_spec.model_fields["type"].default,
            spec=_spec,
            build=build_peft,
            tasks=TEXT_TASKS,
            default_learning_rate=lambda spec, lr=_lr: lr,
            needs_padding=True,
            weights=_weights,
        )
    )
