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
# What rebuilds the trained model: task, labels, pooling, method spec (outputs, checkpoints).
MODEL_INFO_FILE = "tuneq_model.json"


@dataclass(frozen=True)
class WeightsFormat:
    file: str  # the weights file, in checkpoints and in the output
    state: Callable[[Any], dict[str, Any]]  # the trained tensors, by name
    restore: Callable[[Any, dict[str, Any]], None]
    save: Callable[[Any, Path], None]  # write the loadable files into a directory
    # How the job's output is written, where it differs from a checkpoint's save (a
    # conversion for loading on the original base model); None: the same as `save`.
    export: Callable[[Any, Path], None] | None = None


def peft_state(model: Any) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return dict(get_peft_model_state_dict(model))


def peft_restore(model: Any, weights: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, weights)


def peft_save(model: Any, directory: Path) -> None:
    model.save_pretrained(directory)


# A method whose trainable set changes during training (layer-wise unfreezing) names the
# whole set on the model, so checkpoints and the best weights always hold all of it.
TRAINED_NAMES_ATTRIBUTE = "_tuneq_trained_names"


def _trained_state(model: Any) -> dict[str, Any]:
    """The trained parameters by name, and the persistent buffers of the modules that own
    them (batch norm's running statistics move with its trained scale and shift)."""
    names = getattr(model, TRAINED_NAMES_ATTRIBUTE, None)
    if names is not None:
        state = {name: p for name, p in model.named_parameters() if name in names}
    else:
        state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    owners = {name.rpartition(".")[0] for name in state}
    persistent = model.state_dict(keep_vars=True)
    for name, buffer in model.named_buffers():
        if name in persistent and name.rpartition(".")[0] in owners:
            state[name] = buffer
    return state


def _trained_restore(model: Any, weights: dict[str, Any]) -> None:
    known = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"weights for parameters the model does not have: {unknown[:5]}")
    model.load_state_dict(weights, strict=False)


def _trained_save(model: Any, directory: Path) -> None:
    tensors = {n: p.detach().contiguous().cpu() for n, p in _trained_state(model).items()}
    write_trained_weights(tensors, directory)


def write_trained_weights(tensors: dict[str, Any], directory: Path) -> None:
    """The trained-weights files from their tensors (a sharded model's, gathered: fsdp.py)."""
    from safetensors.torch import save_file

    save_file(tensors, directory / TRAINED_WEIGHTS_FILE)
    info = {"format": "tuneq-trained-weights", "version": 1, "tensors": len(tensors)}
    (directory / TRAINED_WEIGHTS_INFO).write_text(json.dumps(info, indent=2))


# LoRA initialised from the weights (PiSSA, OLoRA) trains on a changed base model; the
# output is converted against the adapter as it was initialised, saved here by the builder.
INITIAL_ADAPTER_ATTRIBUTE = "_tuneq_initial_adapter"


def peft_export(model: Any, directory: Path) -> None:
    """The output adapter: as saved, or converted to load on the original base model."""
    initial = getattr(model, INITIAL_ADAPTER_ATTRIBUTE, None)
    if initial is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, path_initial_model_for_weight_conversion=initial)


PEFT_ADAPTER = WeightsFormat(
    "adapter_model.safetensors", peft_state, peft_restore, peft_save, export=peft_export
)
TRAINED_WEIGHTS = WeightsFormat(
    TRAINED_WEIGHTS_FILE, _trained_state, _trained_restore, _trained_save
)


# Prompt learning with an encoder (p-tuning's MLP or LSTM, prefix tuning's projection):
# peft saves the prompts the encoder produces, which is all inference needs but not what
# training continues from. Its checkpoints hold the trainable parameters themselves, and
# the peft adapter beside them; the output is peft's adapter alone.
PROMPT_TRAINING_FILE = "prompt_training_state.safetensors"


def _trainable_parameters(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_adapter_and_trainable(model: Any, directory: Path) -> None:
    from safetensors.torch import save_file

    model.save_pretrained(directory)
    tensors = {n: p.detach().contiguous().cpu() for n, p in _trainable_parameters(model).items()}
    save_file(tensors, directory / PROMPT_TRAINING_FILE)


PROMPT_ENCODER_ADAPTER = WeightsFormat(
    PROMPT_TRAINING_FILE,
    state=_trainable_parameters,
    restore=_trained_restore,
    save=_save_adapter_and_trainable,
    export=peft_save,
)


def load_trained(output_dir: Path | str, base_dir: Path | str, **kwargs: Any) -> Any:
    """A job's output (or checkpoint) on its base model, ready to run.

    `base_dir` is the base model's directory (`peft_engine.models.model_dir(...)`). The
    output's `tuneq_model.json` says what to rebuild: the task head (classification labels,
    pooling) and the method; then a PEFT adapter is loaded with `PeftModel.from_pretrained`,
    or the trained tensors are put back by name on the rebuilt model. Extra keyword arguments
    go to the base model's loader (`dtype=`, `device=`). Within a worker's
    `ResidentModels.active()` the base model is built from the resident weights, shared
    where the method writes none of them (`peft_engine.models.resident`).
    """
    from safetensors.torch import load_file

    from peft_engine.models.resident import resident_loader
    from peft_engine.tasks import task_for

    output_dir = Path(output_dir)
    info = trained_model_info(output_dir)
    task = info["task"]
    method, spec = _method_of(info)
    resident = resident_loader(spec) if spec is not None else None
    if resident is not None:
        kwargs["resident"] = resident
    model = task_for(task).build_model(Path(base_dir), info, **kwargs)
    if (output_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, output_dir)
    if method is not None:  # re-create the method's own modules (bottleneck adapters)
        model = method.build(model, spec, task)
    _trained_restore(model, load_file(output_dir / TRAINED_WEIGHTS_FILE))
    return model


def trained_model_info(output_dir: Path) -> dict[str, Any]:
    """An output's (or checkpoint's) `tuneq_model.json`; a causal LM where there is none."""
    path = Path(output_dir) / MODEL_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {"task": "causal_lm"}


def _method_of(info: dict[str, Any]) -> tuple[Any, Any]:
    """The registered method that trained the output and its spec, when the model info
    names them; (None, None) otherwise."""
    if "method" not in info:
        return None, None
    from peft_engine.methods import METHODS

    method = METHODS[info["method"]["type"]]
    return method, method.spec.model_validate(info["method"])
