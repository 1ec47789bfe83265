"""How a method's trained weights are taken, restored and written (checkpoints, output).

peft methods save a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`,
loaded with `PeftModel.from_pretrained`). Methods that train the model's own parameters
(`full`; later bitfit, head_only, layer-wise unfreezing) save exactly the tensors they
trained, by parameter name, in `trained_weights.safetensors`; `load_trained` puts them back
on the base model. Safetensors and JSON only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"
TRAINED_WEIGHTS_INFO = "tuneq_weights.json"


@dataclass(frozen=True)
class WeightsFormat:
    file: str  # the weights file, in checkpoints and in the output
    state: Callable[[Any], dict[str, Any]]  # the trained tensors, by name
    restore: Callable[[Any, dict[str, Any]], None]
    save: Callable[[Any, Path], None]  # write the loadable files into a directory


def _peft_state(model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model))


def _peft_restore(model: Any, weights: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)


def _peft_save(model: Any, directory: Path) -> None:
    model.save_pretrained(directory)


def _trained_state(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _trained_restore(model: Any, weights: dict[str, Any]) -> None:
    known = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"weights for parameters the model does not have: {unknown[:5]}")
    model.load_state_dict(weights, strict=False)


def _trained_save(model: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    tensors = {n: p.detach().contiguous().cpu() for n, p in _trained_state(model).items()}
    save_file(tensors, directory / TRAINED_WEIGHTS_FILE)
    info = {"format": "tuneq-trained-weights", "version": 1, "tensors": len(tensors)}
    (directory / TRAINED_WEIGHTS_INFO).write_text(json.dumps(info, indent=2))


PEFT_ADAPTER = WeightsFormat("adapter_model.safetensors", _peft_state, _peft_restore, _peft_save)
TRAINED_WEIGHTS = WeightsFormat(
    TRAINED_WEIGHTS_FILE, _trained_state, _trained_restore, _trained_save
)


def load_trained(output_dir: Path | str, base_dir: Path | str, **kwargs: Any) -> Any:
    """A job's output on its base model: a PEFT adapter, or the trained weights put back.

    `base_dir` is the base model's directory (`peft_engine.models.model_dir(...)`); extra
    keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    output_dir = Path(output_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False, **kwargs)
    if (output_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, output_dir)
    _trained_restore(model, load_file(output_dir / TRAINED_WEIGHTS_FILE))
    return model
