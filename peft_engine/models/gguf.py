"""Dequantise a GGUF checkpoint once into a float32 Hugging Face directory that can be trained.

transformers loads a GGUF file with a quantizer attached, which can be neither trained nor
saved; rebuilding the model from its config without the quantizer gives a plain one.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_engine.jsonfile import read_json_object

if TYPE_CHECKING:  # torch and transformers load only when a file is actually converted
    from transformers import PreTrainedModel

_DIGEST_CHARS = 16
_DIGESTS_FILE = "digests.json"


def dequantized_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """`cache_dir/gguf/<digest>/` with config.json, float32 model.safetensors and the tokenizer.

    Built on first use into a private sibling directory and renamed into place, so readers
    never see a half-written one. Processes that start at once take turns on a lock file,
    so one converts and the others find its result (a minute of CPU each, not repeated);
    where locks do not work, the first rename wins.
    """
    target = cached_dequantized_dir(gguf_path, cache_dir)
    if target.is_dir():
        return target
    root = target.parent
    with open(root / f".{target.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():
            return target
        building = root / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        building.mkdir()
        try:
            _write_dequantized(gguf_path, building)
            _publish(building, target)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


def cached_dequantized_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the dequantised directory of this GGUF file is (or will be); builds nothing."""
    root = cache_dir / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    return root / _file_digest(gguf_path, root)


def _write_dequantized(gguf_path: Path, out_dir: Path) -> None:
    """Write the GGUF file's model as float32 safetensors and its tokenizer into `out_dir`."""
    from transformers import AutoTokenizer

    model = _without_quantizer(load_gguf_model(gguf_path))
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False, local_files_only=True
    )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:  # GGUF carries no model_max_length, which would otherwise read as 1e30
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(out_dir)
    _make_readable(out_dir)


def load_gguf_model(gguf_path: Path) -> PreTrainedModel:
    """The GGUF file's model in float32, still carrying its (untrainable) gguf quantizer."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        trust_remote_code=False,
        local_files_only=True,
    )


def _without_quantizer(gguf_model: PreTrainedModel) -> PreTrainedModel:
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    # Strict: every weight must arrive; tied lm_head/embeddings share one tensor in both.
    model.load_state_dict(gguf_model.state_dict())
    return model


def _make_readable(directory: Path) -> None:
    # safetensors writes 0600; the API and the workers may run as different users.
    for path in directory.iterdir():
        path.chmod(path.stat().st_mode | 0o444)


def _publish(building: Path, target: Path) -> None:
    try:
        building.rename(target)
    except OSError:
        # Another process renamed its build into place first; ours is redundant.
        if not target.is_dir():
            raise


def _file_digest(path: Path, memo_dir: Path) -> str:
    """The file's sha256 (first 16 hex digits), remembered per path, size, mtime and inode."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_path = memo_dir / _DIGESTS_FILE
    memo = read_json_object(memo_path)
    known = memo.get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp:
        return str(known["digest"])
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()[:_DIGEST_CHARS]
    memo[key] = {"stamp": stamp, "digest": digest}
    _write_json_atomically(memo_path, memo)
    return digest


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    partial.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(partial, path)
