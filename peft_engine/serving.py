"""Serving compatibility (DESIGN §5, `serving: {"target": "vllm"}`): what vLLM's LoRA
serving can load, judged on the spec at POST /jobs and on an adapter's files.

vLLM refuses an adapter only when it is loaded, long after the GPU time is spent, so a job
that names vLLM as its target is refused at submit for what the loader would refuse. The
rules follow vLLM's source as of late 2025 (v0.11/v0.12; re-read on main, 2026):

- vllm/lora/peft_helper.py (`PEFTHelper.from_dict`, `validate_legal`): adapter_config.json
  must hold `r`, `lora_alpha` and `target_modules`; `modules_to_save` must be empty ("vLLM
  only supports modules_to_save being None"), `use_dora` false ("vLLM does not yet support
  DoRA"; issue #10849 is open, PR #47395 unmerged), `bias` "none"; `r` at most the server's
  `--max-lora-rank`. `use_rslora` is supported (scaling alpha/sqrt(r)). `rank_pattern` and
  `alpha_pattern` are not read: every module is scaled by lora_alpha/r.
- vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`.
- vllm/lora/utils.py (`parse_fine_tuned_lora_name`): tensors are `<module>.lora_A.weight`,
  `<module>.lora_B.weight`, `<module>.lora_embedding_A`/`_B`; any other tensor (a DoRA
  magnitude, AdaLoRA's lora_E, a bias, a whole trained module) is "unsupported LoRA weight";
  `...embed_tokens.base_layer.weight` and `...lm_head.base_layer.weight` are skipped.
- vllm/lora/worker_manager.py (`_load_adapter`) and vllm/lora/lora_model.py
  (`from_local_checkpoint`): each tensor's module (its last name) must be one the model
  class takes LoRA on: its linear layers (`get_supported_lora_modules`), packed ones
  unpacked (`packed_modules_mapping`: qkv_proj -> q/k/v_proj, gate_up_proj ->
  gate/up_proj), and its `embedding_modules` (vllm/model_executor/models/llama.py:
  embed_tokens, lm_head; qwen2.py and qwen3.py: none). GPT-2 has no `SupportsLoRA`.
- Prompt adapters (prompt tuning, p-tuning, prefix tuning) were removed with the V0 engine
  (PR #20588, v0.10.0); IA3, LoHa, LoKr, OFT, VeRA, AdaLoRA and bottleneck adapters have
  no loader, and full/partial fine-tuning writes weights, not an adapter.

Not run against vLLM here (it is not installed, and there is no GPU): these are its rules
as its source states them. A method whose weights can merge is also served by vLLM as a
plain model after a merged export (`export.merged`), with no LoRA rules at all.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_engine.errors import SpecError, UserError

if TYPE_CHECKING:
    from peft_engine.models.registry import ModelEntry, ModelRegistry
    from peft_engine.spec import JobSpec

# vllm/config/lora.py: the values `--max-lora-rank` accepts.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Model family (config.json's model_type) -> the module names vLLM takes LoRA on, as peft
# names them. Mistral checkpoints load as vLLM's LlamaForCausalLM.
VLLM_LORA_MODULES: dict[str, tuple[str, ...]] = {
    "llama": (*_PROJECTIONS, "embed_tokens", "lm_head"),
    "mistral": (*_PROJECTIONS, "embed_tokens", "lm_head"),
    "qwen2": _PROJECTIONS,
    "qwen3": _PROJECTIONS,
}

# Methods that produce no LoRA adapter, and why vLLM cannot load what they produce.
_NOT_LORA = {
    "prompt_tuning": "vLLM removed prompt adapters in v0.10 (PR #20588)",
    "p_tuning": "vLLM removed prompt adapters in v0.10 (PR #20588)",
    "prefix_tuning": "vLLM removed prompt adapters in v0.10 (PR #20588)",
    "adalora": "vLLM reads no rank_pattern and refuses AdaLoRA's lora_E tensors",
    "ia3": "its scaling vectors are not LoRA weights vLLM parses",
    "loha": "its hada_* tensors are not LoRA weights vLLM parses",
    "lokr": "its lokr_* tensors are not LoRA weights vLLM parses",
    "oft": "vLLM has no OFT loader",
    "vera": "its shared vera_A/vera_B projections are not LoRA weights vLLM parses",
    "bottleneck_adapter": "it writes tuneq's own adapter layers as trained weights",
    "full": "it writes trained weights, not an adapter",
    "layerwise_unfreeze": "it writes trained weights, not an adapter",
    "bitfit": "it writes trained weights, not an adapter",
    "head_only": "it writes trained weights, not an adapter",
}


class AdapterNotServable(UserError):
    """An adapter's files that vLLM's LoRA loader would refuse; `param` names the file and key."""

    code = "adapter_not_servable"


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of this rank."""
    return next(value for value in VLLM_MAX_LORA_RANKS if value >= rank)


def check_serving(spec: JobSpec) -> None:
    """Refuse a spec whose result vLLM's LoRA serving cannot load (no-op without `serving`).

    Judged on the spec alone; the target modules depend on the model family, which
    `check_serving_model` judges where the registry is known.
    """
    if spec.serving is None:
        return
    method = spec.method
    if spec.task != "causal_lm":
        raise SpecError(
            f"vLLM serves LoRA adapters for causal_lm; a {spec.task} job trains a new head "
            "saved whole (peft's modules_to_save), which vLLM's loader refuses",
            param="task",
        )
    if method.type != "lora":
        reason = _NOT_LORA.get(method.type, "vLLM's loader reads LoRA adapters only")
        raise SpecError(
            f"vLLM serving loads LoRA adapters only, not {method.type!r}: {reason}; use "
            'method "lora", or drop serving and use a merged export where the method merges',
            param="method.type",
        )
    if method.use_dora:
        raise SpecError(
            'vLLM does not load DoRA adapters ("vLLM does not yet support DoRA"); '
            "set use_dora to false",
            param="method.use_dora",
        )
    rank = adapter_rank(spec)
    if rank > VLLM_MAX_LORA_RANKS[-1]:
        doubled = f" (init {method.init!r} saves rank 2r = {rank})" if rank != method.r else ""
        raise SpecError(
            f"vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]} (--max-lora-rank); "
            f"this adapter has rank {rank}{doubled}",
            param="method.r",
        )


def adapter_rank(spec: JobSpec) -> int:
    """The saved adapter's rank: PiSSA and OLoRA are converted to a plain LoRA of rank 2r."""
    return spec.method.r * (2 if spec.method.init in ("pissa", "olora") else 1)


def check_serving_model(spec: JobSpec, registry: ModelRegistry, cache_dir: Path) -> None:
    """`check_serving`, then the family's rules: the targets must be modules vLLM's class
    for the family takes LoRA on. The family is the registry's, else config.json's
    model_type. Called where the registry is known (the API's plan_job), before any data is
    read; "all-linear" and r are not "auto" values, so the spec as sent is the one judged."""
    if spec.serving is None:
        return
    check_serving(spec)
    entry = registry.get(spec.model)
    family = entry.family or _model_type(entry, cache_dir)
    modules = _family_modules(family, param="model")
    targets = spec.method.target_modules
    if targets == "all-linear":
        return  # peft's all-linear on a causal LM: the attention and MLP projections
    refused = [name for name in targets if name.rsplit(".", 1)[-1] not in modules]
    if refused:
        raise SpecError(
            f"vLLM takes LoRA on {family} models only on {', '.join(modules)}; "
            f"not on {', '.join(refused)}",
            param="method.target_modules",
        )


def _model_type(entry: ModelEntry, cache_dir: Path) -> str | None:
    from peft_engine.models.loading import model_dir, read_model_info

    path = model_dir(entry, cache_dir, build=False)  # None: a GGUF not yet converted
    if path is None:
        return None
    return read_model_info(path).model_type or None


def _family_modules(family: str | None, *, param: str, error: type = SpecError) -> tuple:
    if family in VLLM_LORA_MODULES:
        return VLLM_LORA_MODULES[family]
    hint = "; set the model's family in the registry, or drop serving" if param == "model" else ""
    raise error(
        f"model family {family or 'unknown'!r} is not one whose vLLM LoRA loading tuneq "
        f"checks ({', '.join(VLLM_LORA_MODULES)}){hint}",
        param=param,
    )


# ---------------------------------------------------------------------------------------
# An adapter's files, read the way vLLM's loader reads them
# ---------------------------------------------------------------------------------------

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_BASE_EMBEDDINGS = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


@dataclass(frozen=True)
class ServableAdapter:
    """What a passing adapter needs from `vllm serve`: its rank and the modules it changes."""

    rank: int
    modules: tuple[str, ...]
    max_lora_rank: int  # the smallest --max-lora-rank that loads it


def check_adapter_files(directory: Path, family: str) -> ServableAdapter:
    """Check an adapter directory against vLLM's LoRA loader for a model `family`, without
    vLLM: the config keys PEFTHelper reads, the tensor names and shapes LoRAModel reads.
    Raises AdapterNotServable naming the file and the key at fault."""
    modules = _family_modules(family, param="family", error=AdapterNotServable)
    config = _read_config(Path(directory) / CONFIG_FILE)
    rank = config["r"]
    loaded: dict[str, dict[str, list[int]]] = {}
    for name, shape in _tensor_shapes(Path(directory) / WEIGHTS_FILE).items():
        if name.endswith(_BASE_EMBEDDINGS):
            continue  # the base embeddings peft saves with a resized vocabulary: skipped
        module, part = _lora_part(name)
        if module.rsplit(".", 1)[-1] not in modules:
            raise _file_error(
                WEIGHTS_FILE, name, f"vLLM takes LoRA on {family} only on {', '.join(modules)}"
            )
        loaded.setdefault(module, {})[part] = shape
    if not loaded:
        raise _file_error(WEIGHTS_FILE, "", "holds no LoRA tensors")
    for module, parts in loaded.items():
        _check_pair(module, parts, rank)
    suffixes = sorted({module.rsplit(".", 1)[-1] for module in loaded})
    return ServableAdapter(rank, tuple(suffixes), vllm_max_lora_rank(rank))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _file_error(CONFIG_FILE, "", f"cannot be read: {err}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise _file_error(CONFIG_FILE, "peft_type", f"{config['peft_type']} is not LoRA")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if key not in config]
    if missing:
        raise _file_error(CONFIG_FILE, missing[0], "is required by vLLM's PEFTHelper")
    rank = config["r"]
    refusals = {
        "r": (type(rank) is not int or not 1 <= rank <= VLLM_MAX_LORA_RANKS[-1])
        and f"must be an integer in 1..{VLLM_MAX_LORA_RANKS[-1]} (--max-lora-rank)",
        "modules_to_save": bool(config.get("modules_to_save"))
        and "vLLM only supports modules_to_save being None",
        "use_dora": bool(config.get("use_dora")) and "vLLM does not yet support DoRA",
        "bias": config.get("bias", "none") != "none" and "adapter bias is not supported",
        "rank_pattern": bool(config.get("rank_pattern"))
        and "vLLM reads no rank_pattern: every module would be scaled by lora_alpha/r",
        "alpha_pattern": bool(config.get("alpha_pattern"))
        and "vLLM reads no alpha_pattern: every module would be scaled by lora_alpha/r",
    }
    for key, reason in refusals.items():
        if reason:
            raise _file_error(CONFIG_FILE, key, reason)
    return config


def _lora_part(name: str) -> tuple[str, str]:
    """(module, "A" or "B") as vLLM's parse_fine_tuned_lora_name reads a tensor name."""
    stem = name.removeprefix("base_model.model.")
    for suffix, part in (
        (".lora_A.weight", "A"),
        (".lora_B.weight", "B"),
        (".lora_embedding_A", "A"),
        (".lora_embedding_B", "B"),
    ):
        if stem.endswith(suffix):
            return stem.removesuffix(suffix), part
    raise _file_error(WEIGHTS_FILE, name, "is an unsupported LoRA weight for vLLM")


def _check_pair(module: str, parts: dict[str, list[int]], rank: int) -> None:
    """A is [r, in] and B [out, r] (embeddings: A [r, vocab], B [dim, r]), r the config's."""
    if set(parts) != {"A", "B"}:
        raise _file_error(WEIGHTS_FILE, module, "needs both lora_A and lora_B")
    a, b = parts["A"], parts["B"]
    if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
        raise _file_error(
            WEIGHTS_FILE,
            module,
            f"has A {a} and B {b}, not rank {rank} (A [r, in], B [out, r]) as r says",
        )


def _tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from a safetensors header (8-byte length, then JSON)."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise _file_error(WEIGHTS_FILE, "", f"cannot be read: {err}") from None
    return {name: info["shape"] for name, info in header.items() if name != "__metadata__"}


def _file_error(file: str, key: str, message: str) -> AdapterNotServable:
    return AdapterNotServable(message, param=f"{file}:{key}" if key else file)
