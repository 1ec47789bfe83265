"""Base models: the operator's registry, and loading a registry entry from local files.

The registry imports no torch (the API lists models with it); the loaders load torch and
transformers on first use.
"""

from __future__ import annotations

from typing import Any

from peft_engine.models.registry import (
    BUILTIN_MODELS,
    ModelEntry,
    ModelRegistry,
    ModelSource,
    Task,
    load_registry,
)

_LOADERS = {
    "dequantized_dir": "peft_engine.models.gguf",
    "ModelInfo": "peft_engine.models.loading",
    "ResidentModels": "peft_engine.models.resident",
    "load_causal_lm": "peft_engine.models.loading",
    "load_tokenizer": "peft_engine.models.loading",
    "model_dir": "peft_engine.models.loading",
    "read_model_info": "peft_engine.models.loading",
}

__all__ = [
    "BUILTIN_MODELS",
    "ModelEntry",
    "ModelRegistry",
    "ModelSource",
    "Task",
    "load_registry",
    *_LOADERS,
]


def __getattr__(name: str) -> Any:
    if name in _LOADERS:
        import importlib

        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(name)
