"""The catalogue of fine-tuning methods: each module holds a spec, a builder, a registration.

The registry lives in `peft_engine.methods.registry`; importing this package imports every
method module, so `METHODS` is complete whichever module is imported first. It stays cheap
(no torch, no peft) because the API validates specs with it; builders import what they
need when they run.
"""

from peft_engine.methods import (  # noqa: F401  (each registers itself; this order is METHODS')
    adalora,
    bitfit,
    bottleneck,
    full,
    head_only,
    ia3,
    layerwise,
    loha,
    lokr,
    lora,
    oft,
    prompt_learning,
    vera,
)
from peft_engine.methods.registry import METHODS, MethodDef, method_for, register

__all__ = ["METHODS", "MethodDef", "method_for", "register"]
