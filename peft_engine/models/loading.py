"""From a registry entry to a Hugging Face directory, and from there to a tokenizer or model.

Everything loads from local files only, with `trust_remote_code` off: a model directory
never chooses code to run.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError

from peft_engine.errors import ModelNotFoundError
from peft_engine.models.gguf import cached_dequantized_dir, dequantized_dir
from peft_engine.models.registry import ModelEntry
from peft_engine.models.resident import active_models

if TYPE_CHECKING:  # locating files and reading configs needs neither (the API uses them)
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from peft_engine.models.resident import ResidentLoader

CONFIG_FILE = "config.json"


def model_dir(
    entry: ModelEntry, cache_dir: Path, *, hub_cache: Path | None = None, build: bool = True
) -> Path | None:
    """The entry's Hugging Face-format directory; GGUF files are dequantised into `cache_dir`.

    `hub_cache` overrides the Hugging Face hub cache (default: huggingface_hub's own setting).
    With `build=False` a GGUF entry not yet dequantised gives None instead (no torch needed).
    """
    if entry.source.type == "gguf":
        gguf_path = _source_path(entry)
        if not gguf_path.is_file():
            raise _not_found(entry, f"has no GGUF file at {gguf_path}")
        if not build:
            cached = cached_dequantized_dir(gguf_path, cache_dir)
            return cached if cached.is_dir() else None
        return dequantized_dir(gguf_path, cache_dir)
    if entry.source.type == "local":
        return _checked_hf_dir(entry, _source_path(entry))
    return _checked_hf_dir(entry, _hub_snapshot(entry, hub_cache))


def _source_path(entry: ModelEntry) -> Path:
    source = entry.source
    if source.path is not None:
        return source.path
    assert source.package is not None  # guaranteed by ModelSource's location check
    return _package_dir(entry, source.package) / (source.file or source.subdir or "")


def _package_dir(entry: ModelEntry, package: str) -> Path:
    # find_spec locates the package without importing it (its __init__ may need missing deps).
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise _not_found(entry, f"needs the Python package '{package}', which is not installed")
    if spec.origin is None:  # a namespace package: no __init__.py
        return Path(next(iter(spec.submodule_search_locations or [])))
    return Path(spec.origin).parent


def _hub_snapshot(entry: ModelEntry, hub_cache: Path | None) -> Path:
    source = entry.source
    assert source.repo_id is not None  # guaranteed by ModelSource's location check
    try:
        snapshot = snapshot_download(
            source.repo_id, revision=source.revision, cache_dir=hub_cache, local_files_only=True
        )
    except LocalEntryNotFoundError:
        revision = f" at revision '{source.revision}'" if source.revision else ""
        raise _not_found(
            entry,
            f"('{source.repo_id}'{revision}) is not in the hub cache of this offline deployment",
        ) from None
    return Path(snapshot)


def _checked_hf_dir(entry: ModelEntry, path: Path) -> Path:
    if not (path / CONFIG_FILE).is_file():
        raise _not_found(entry, f"has no Hugging Face model directory at {path} (no {CONFIG_FILE})")
    return path


def _not_found(entry: ModelEntry, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"model '{entry.name}' {reason}", param="model")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer; the worker's resident one when a cache is active."""
    resident = active_models()
    if resident is not None:
        return resident.tokenizer(_read_tokenizer, path)
    return _read_tokenizer(path)


def _read_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def load_causal_lm(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    resident: ResidentLoader | None = None,
) -> PreTrainedModel:
    """The causal LM from its directory, or built from the resident weights (`resident`)."""
    if resident is not None:
        return resident.load(  # type: ignore[return-value]
            load_causal_lm,
            path,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
        )
    from transformers import AutoModelForCausalLM

    return from_model_dir(
        AutoModelForCausalLM,
        path,
        dtype=dtype,
        device=device,
        attn_implementation=attn_implementation,
    )


def from_model_dir(
    auto_class: Any,
    path: Path,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    **options: Any,
) -> Any:
    """`auto_class.from_pretrained` on the directory's files alone, float32 unless told."""
    import torch

    return auto_class.from_pretrained(
        path,
        dtype=dtype or torch.float32,
        device_map=device,
        trust_remote_code=False,
        local_files_only=True,
        **options,
    )


@dataclass(frozen=True)
class ModelInfo:
    """What config.json says about a model's shape; None where the family does not say."""

    model_type: str
    architectures: tuple[str, ...]
    max_position_embeddings: int | None
    hidden_size: int | None
    num_hidden_layers: int | None
    vocab_size: int | None


def read_model_info(path: Path) -> ModelInfo:
    """Read from config.json alone: cheap, no weights loaded."""
    config = _read_config(path)
    return ModelInfo(
        model_type=str(config.get("model_type", "")),
        architectures=tuple(config.get("architectures") or ()),
        max_position_embeddings=_first_int(
            config, "max_position_embeddings", "n_positions", "max_seq_len"
        ),
        hidden_size=_first_int(config, "hidden_size", "n_embd", "d_model"),
        num_hidden_layers=_first_int(config, "num_hidden_layers", "n_layer", "num_layers"),
        vocab_size=_first_int(config, "vocab_size"),
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"{path} is not a readable Hugging Face model directory: {err}", param="model"
        ) from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{path / CONFIG_FILE} is not a JSON object", param="model")
    return config


def _first_int(config: dict[str, Any], *keys: str) -> int | None:
    """The first of `keys` that config.json sets: families name the same thing differently."""
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
