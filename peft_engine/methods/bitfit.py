"""BitFit (Ben Zaken et al. 2022): train only the bias terms (and the task head).

About 0.1% of an encoder's parameters, and competitive with full fine-tuning on many
classification tasks. Families without biases (Llama and most recent decoders) have
nothing to train, so they are not supported. The output holds the trained tensors by name.
"""

from __future__ import annotations

from typing import Any, Literal

from peft_engine.methods.common import BERT_LIKE, TEXT_TASKS, MethodSpec, unfreeze_task_head
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import TRAINED_WEIGHTS

# Families whose layers carry bias terms.
BIAS_FAMILIES = (*BERT_LIKE, "gpt2")


class BitfitMethod(MethodSpec):
    type: Literal["bitfit"] = "bitfit"


def build_bitfit(model: Any, spec: BitfitMethod, task: str) -> Any:
    biases = 0
    for name, parameter in model.named_parameters():
        is_bias = name == "bias" or name.endswith(".bias")
        parameter.requires_grad_(is_bias)
        biases += is_bias
    if biases == 0:
        raise ValueError(f"{type(model).__name__} has no bias terms for BitFit to train")
    unfreeze_task_head(model, task)
    return model


register(
    MethodDef(
        type="bitfit",
        spec=BitfitMethod,
        build=build_bitfit,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 1e-3,
        weights=TRAINED_WEIGHTS,
        families=BIAS_FAMILIES,
    )
)
