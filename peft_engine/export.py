"""A job's output as one plain model: the base with the adapter merged into its weights.

`export_merged` rebuilds the trained model the way `load_trained` does (the output's
`tuneq_model.json` says the task and the method), folds a peft adapter into the base
weights (`merge_and_unload`), casts to the asked dtype and writes safetensors shards with
config, generation config, tokenizer and chat template (copied from the job's output, which
holds the tokenizer the job trained with). The result loads with plain
`AutoModelForCausalLM.from_pretrained(target)`: no peft, no tuneq.

What can merge is decided without torch (`peft_engine.spec_delivery.merge_refusal`, also
checked at submit): peft's mergeable methods, and the methods that train the model's own
weights (their output is a whole model already). Prompt learning and bottleneck adapters
are refused with the reason.

The base is loaded in the export dtype, not in 4-bit, also for a QLoRA job
(`base_precision: "nf4"`): merging into 4-bit weights would round the sum back to 4 bits.
The adapter was trained against the NF4-rounded base, so a QLoRA job's merged model differs
from the model evaluated during training by the base's quantisation error (README, QLoRA).
It is loaded on the CPU: a worker's device memory stays its jobs'; the merge needs the
model's size in the export dtype in host memory (2 bytes a parameter for bf16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from peft_engine.errors import UserError
from peft_engine.methods.weights import load_trained, trained_model_info
from peft_engine.spec_delivery import merge_refusal

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
EXPORT_INFO_FILE = "tuneq_export.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

# The tokenizer's files, as `save_pretrained` writes them for the tokenizers we load
# (fast tokenizers, SentencePiece, BPE vocabularies), and the chat template beside them.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class MergeRefused(UserError):
    """The output's method (or task) has nothing a plain model's weights can hold."""

    code = "export_not_supported"


def merged_artifact_name(dtype: str) -> str:
    return f"merged-{dtype}.tar.gz"


def export_merged(
    output_dir: Path | str,
    base_dir: Path | str,
    target_dir: Path | str,
    dtype: str = "bf16",
    *,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> dict[str, Any]:
    """Write the merged model of a job's output into `target_dir` (created; it must not
    hold another model). `base_dir` is the base model's directory (the operator's registry:
    `peft_engine.models.model_dir`). Returns what `tuneq_export.json` records."""
    import torch

    output_dir, target_dir = Path(output_dir), Path(target_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    info = trained_model_info(output_dir)
    method_type = (info.get("method") or {}).get("type", _method_from_files(output_dir))
    reason = merge_refusal(info.get("task", "causal_lm"), method_type)
    if reason is not None:
        raise MergeRefused(reason, param="export.merged")
    torch_dtype = getattr(torch, DTYPES[dtype])
    model = load_trained(output_dir, base_dir, dtype=torch_dtype, device="cpu")
    if hasattr(model, "merge_and_unload"):  # a peft model; whole-weights methods are not
        model = model.merge_and_unload(safe_merge=True)
    model = model.to(torch_dtype).eval()
    target_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target_dir, max_shard_size=max_shard_size)
    copied = copy_tokenizer(output_dir, target_dir)
    record = {
        "format": "tuneq-merged-model",
        "version": 1,
        "method": method_type,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_files": copied,
    }
    (target_dir / EXPORT_INFO_FILE).write_text(json.dumps(record, indent=2))
    return record


def copy_tokenizer(output_dir: Path, target_dir: Path) -> list[str]:
    """The job's tokenizer and chat template, as the job saved them: the names copied."""
    copied = []
    for name in _TOKENIZER_FILES:
        if (output_dir / name).is_file():
            shutil.copy2(output_dir / name, target_dir / name)
            copied.append(name)
    return copied


def _method_from_files(output_dir: Path) -> str:
    """An output without method info (older outputs): a peft adapter's type, or LoRA."""
    config = output_dir / "adapter_config.json"
    if not config.is_file():
        return "full"
    return str(json.loads(config.read_text()).get("peft_type", "LORA")).lower()
