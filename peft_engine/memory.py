"""A job's peak training memory, from the model's files alone (no torch: the API calls it).

    peak = weights + trained state + activations

    weights        the frozen parameters, in the compute dtype (bf16/fp16: 2 bytes, fp32: 4);
                   in bf16/fp16 a trained parameter also has its autocast copy (2 bytes).
                   With base_precision "nf4" (QLoRA) the body's linear weights are 4-bit
                   NF4 with double-quantised constants, NF4_BITS a weight (4 bits, an 8-bit
                   absmax per block of 64, a float32 constant per 256 blocks: 4.127), plus
                   the one layer bitsandbytes dequantises at a time (the largest, in the
                   compute dtype); embeddings, norms and the LM head stay in the compute dtype
    trained state  each trained parameter: float32 master weight, gradient and AdamW's two
                   moments, 16 bytes (peft_engine/precision.py keeps them all in float32)
    on N GPUs      (resources.gpus) each rank's peak: its share of a step's examples; data
                   parallel keeps the whole model on each, full fine-tuning (FSDP) splits
                   weights and trained state N ways plus one block gathered (`per_rank`)
    activations    what autograd keeps for the backward pass, per token of one forward pass
                   (`forward_tokens`), plus the gradients of the layer being differentiated

Parameter counts are exact: the shapes come from the safetensors headers (a few KB read, no
weights loaded); a method's trained parameters are counted on them (`trained_parameters`).
The activations of one decoder layer and one token, in elements of the compute dtype, are
what a Llama-style layer saves for its backward pass, as the engine runs it (packed
per-example attention, the fused LoRA layer, the fused loss):

    attention   the layer's input and its normed copy (2h), q after rotary, the attention
                output and its reshaped copy for o_proj (3 q-widths), k and v (2 kv-widths)
    MLP         the residual and its normed copy (2h); gate, SiLU(gate), up and their
                product (4i) for a gated MLP, the up projection, its GELU input and output
                (3i) otherwise
    full / layerwise_unfreeze  the norms' inputs before their (trained) scales (2h more)
    LoRA        r numbers per adapted layer (float32), and with dropout a one-byte mask of
                each adapted layer's input

With gradient checkpointing a layer keeps only its input (h) and is recomputed in the
backward pass, so one layer's activations live at a time instead of all of them. Outside
the layers: the final norm (2h), and the loss: with the fused loss (peft_engine/fused_loss.py)
a fixed CHUNK_ROWS x vocabulary block of logits (x3: logits, softmax, gradient), without it
every token's logits in the compute dtype, their float32 log-softmax and its gradient.
Classification tasks batch padded examples through the masked attention path, which also
keeps each head's attention weights (heads x sequence length a token, twice).

bench/memory.py compares these figures with measured peaks (README's table). What this
does not count: the CUDA context and allocator slack on a GPU, temporaries of the
optimizer's step (foreach AdamW briefly copies a few state tensors), and for adapter methods
other than LoRA/AdaLoRA/LoHa/LoKr their own layer shapes (counted as a rank-8 LoRA on the
same layers: a few MB either way next to the weights).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from peft_engine.data.formats import PREFERENCE_OBJECTIVES

# The figures peft_engine/fused_loss.py and peft_engine/training.py use; they import torch,
# which the API never does (tests/test_memory_estimate.py holds these equal to theirs).
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gpt2"})
CHUNK_ROWS = 256
GPU_TOKENS_PER_FORWARD = 16_384

COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TRAINED_STATE_BYTES = 16  # float32 parameter, gradient, AdamW's exp_avg and exp_avg_sq
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # bitsandbytes' NF4, blocks of 64, double quant
FULL_METHODS = frozenset({"full", "layerwise_unfreeze"})  # every weight trained (at the end)
TRAINS_BASE = FULL_METHODS | {"bitfit"}
FALLBACK_RANK = 8  # adapter methods whose own shapes are not modelled: a rank-8 LoRA
_PARAMETER_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_EMBEDDINGS = ("embed", "wte", "wpe", "lm_head", "shared")


@dataclass(frozen=True)
class ModelShape:
    """What the memory model reads from a model directory: config.json's sizes and every
    parameter's shape (name -> shape) from its safetensors headers."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool
    shapes: dict[str, tuple[int, ...]]

    @property
    def parameters(self) -> int:
        return sum(_numel(shape) for shape in self.shapes.values())

    def linear_layers(self) -> dict[str, tuple[int, int]]:
        """Every linear layer of the body, name -> (in, out): a 2-D weight that is not an
        embedding or the output layer (peft's "all-linear")."""
        found = {}
        for name, shape in self.shapes.items():
            if len(shape) == 2 and name.endswith(".weight") and not _is_embedding(name):
                found[name.removesuffix(".weight")] = (shape[1], shape[0])
        return found


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    trained_state_bytes: int
    activations_bytes: int
    gradient_checkpointing: bool
    tokens_per_forward: int
    trained_parameters: int
    compute_dtype: str  # fp32 | bf16 | fp16
    base_precision: str = "auto"  # auto (the compute dtype) | nf4
    ranks: int = 1  # the job's GPUs (resources.gpus): the figures are each one's
    sharded: bool = False  # full fine-tuning on several ranks: FSDP (fsdp.py)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.trained_state_bytes + self.activations_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, **asdict(self)}


def read_model_shape(path: Path) -> ModelShape | None:
    """The shape of the model in `path`; None without a config.json or safetensors weights."""
    config_file = path / "config.json"
    shapes = _safetensors_shapes(path)
    if not config_file.is_file() or not shapes:
        return None
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config = config.get("text_config", config)  # a multimodal wrapper: its language model
    hidden = _first(config, "hidden_size", "n_embd", "d_model", "dim") or 0
    heads = _first(config, "num_attention_heads", "n_head", "num_heads") or 1
    return ModelShape(
        model_type=str(config.get("model_type", "")),
        hidden=hidden,
        intermediate=_first(config, "intermediate_size", "n_inner", "hidden_dim") or 4 * hidden,
        layers=_first(config, "num_hidden_layers", "n_layer", "num_layers", "n_layers") or 0,
        heads=heads,
        kv_heads=_first(config, "num_key_value_heads") or heads,
        head_dim=_first(config, "head_dim") or hidden // heads,
        vocab=_first(config, "vocab_size") or 0,
        gated_mlp=any(name.endswith("gate_proj.weight") for name in shapes),
        shapes=shapes,
    )


def trained_parameters(shape: ModelShape, method: Any) -> int:
    """The parameters `method` (a method spec) trains on this model: exact for full,
    layer-wise unfreezing (all, by its last stage), BitFit (the biases) and the LoRA family
    (r x (in + out) for each adapted layer; DoRA adds a magnitude per output; LoHa two such
    pairs); other adapters as a rank-FALLBACK_RANK LoRA. A new task head is not counted."""
    kind = method.type
    if kind in FULL_METHODS:
        return shape.parameters
    if kind == "bitfit":
        return sum(_numel(s) for name, s in shape.shapes.items() if name.endswith(".bias"))
    if kind == "head_only":
        return 0
    rank = getattr(method, "init_r", None) or getattr(method, "r", None) or FALLBACK_RANK
    pairs = 2 if kind == "loha" else 1
    total = 0
    for fan_in, fan_out in adapted_layers(shape, method).values():
        total += pairs * rank * (fan_in + fan_out)
        total += fan_out if getattr(method, "use_dora", False) else 0
    return total


def adapted_layers(shape: ModelShape, method: Any) -> dict[str, tuple[int, int]]:
    """The linear layers an adapter method adapts: all of them, or those whose name ends
    with one of `target_modules` (as peft matches names)."""
    layers = shape.linear_layers()
    targets = getattr(method, "target_modules", "all-linear")
    if targets == "all-linear":
        return layers
    return {
        name: sizes
        for name, sizes in layers.items()
        if any(name == t or name.endswith("." + t) for t in targets)
    }


def layer_activation_bytes(
    shape: ModelShape, method: Any, *, compute_bytes: int, padded_length: int | None = None
) -> float:
    """Bytes one token's activations take in one decoder layer (see the module docstring);
    `padded_length`: the batch is padded to it and attention weights are kept."""
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    elements = 2 * h + 3 * q + 2 * kv  # attention
    elements += 2 * h + (4 * i if shape.gated_mlp else 3 * i)  # MLP
    if method.type in FULL_METHODS:
        elements += 2 * h
    if padded_length is not None:
        elements += 2 * shape.heads * padded_length
    extra = 0.0
    if method.type in ("lora", "adalora"):
        adapted = list(adapted_layers(shape, method).values())
        per_layer = len(adapted) / max(1, shape.layers)
        rank = getattr(method, "init_r", None) or getattr(method, "r", FALLBACK_RANK)
        extra += per_layer * rank * 4
        if getattr(method, "dropout", 0.0) > 0:
            extra += sum(fan_in for fan_in, _ in adapted) / max(1, shape.layers)
    return elements * compute_bytes + extra


def activation_bytes(
    shape: ModelShape,
    method: Any,
    *,
    tokens: int,
    compute_bytes: int,
    checkpointing: bool,
    task: str = "causal_lm",
    padded_length: int | None = None,
) -> int:
    """Activation bytes at the peak of a training step of `tokens` tokens a forward pass:
    what is saved for the backward pass (every layer's activations, or with checkpointing
    every layer's input and one layer's recomputed activations; the final norm; the loss's
    own), and the larger of the two transients on top of it: the gradients of the layer
    being differentiated, or the fused loss's chunk of logits at the end of the forward."""
    layer = layer_activation_bytes(
        shape, method, compute_bytes=compute_bytes, padded_length=padded_length
    )
    if checkpointing:
        kept = shape.layers * shape.hidden * compute_bytes + layer
    else:
        kept = shape.layers * layer
    saved = (kept + 2 * shape.hidden * compute_bytes) * tokens  # + the final norm's
    transient = layer * tokens
    if task == "causal_lm" and shape.vocab:
        if shape.model_type in FUSED_MODEL_TYPES:  # the hidden states' gradient, float32
            saved += 2 * shape.hidden * 4 * tokens
            chunk = 3 * min(tokens, CHUNK_ROWS) * shape.vocab * 4  # logits, softmax, grad
            transient = max(transient, chunk)
        else:  # every token's logits, their float32 log-softmax and its gradient
            saved += tokens * shape.vocab * (compute_bytes + 8)
    return int(saved + transient)


def estimate_memory(
    shape: ModelShape,
    method: Any,
    *,
    tokens: int,
    precision: str,
    checkpointing: bool,
    task: str = "causal_lm",
    padded_length: int | None = None,
    base_precision: str = "auto",
) -> MemoryEstimate:
    """The peak memory of training `method` on this model, `tokens` tokens a forward pass,
    in `precision` (fp32 | bf16 | fp16), the frozen base in `base_precision` (auto | nf4)."""
    compute_bytes = COMPUTE_BYTES[precision]
    trained = trained_parameters(shape, method)
    # an adapter's parameters are new ones; full, layer-wise and BitFit train the base's own
    frozen = shape.parameters - (trained if method.type in TRAINS_BASE else 0)
    autocast_copies = trained * compute_bytes if compute_bytes < 4 else 0
    return MemoryEstimate(
        weights_bytes=frozen_bytes(shape, frozen, compute_bytes, base_precision) + autocast_copies,
        trained_state_bytes=trained * TRAINED_STATE_BYTES,
        activations_bytes=activation_bytes(
            shape,
            method,
            tokens=tokens,
            compute_bytes=compute_bytes,
            checkpointing=checkpointing,
            task=task,
            padded_length=padded_length,
        ),
        gradient_checkpointing=checkpointing,
        tokens_per_forward=tokens,
        trained_parameters=trained,
        compute_dtype=precision,
        base_precision=base_precision,
    )


def frozen_bytes(shape: ModelShape, frozen: int, compute_bytes: int, base_precision: str) -> int:
    """Bytes of `frozen` frozen parameters: all in the compute dtype, or with "nf4" the
    body's linear weights in NF4 and the largest of them dequantised (module docstring)."""
    if base_precision != "nf4":
        return frozen * compute_bytes
    linear = [fan_in * fan_out for fan_in, fan_out in shape.linear_layers().values()]
    quantized = sum(linear)
    dequantized = max(linear, default=0) * compute_bytes
    return int((frozen - quantized) * compute_bytes + quantized * NF4_BITS / 8) + dequantized


def forward_tokens(
    *, batch_size: int, sequence_tokens: int, budget: int, sequences_per_example: int = 1
) -> int:
    """The most tokens one forward pass holds: a micro-batch of `batch_size` examples of at
    most `sequence_tokens` each, which a causal LM step cuts into runs of at most `budget`
    tokens (an example longer than that goes alone: peft_engine/data/steps.py)."""
    example = sequence_tokens * sequences_per_example
    return min(batch_size * example, max(budget, example))


def job_memory(path: Path | None, spec: Any, *, longest_sequence: int) -> dict[str, Any] | None:
    """The estimate's `memory` for a resolved job spec on the model in `path`, as a GPU runs
    it ("auto" precision: bf16; a forward pass of up to GPU_TOKENS_PER_FORWARD tokens), with
    peak_bytes for checkpointing off and on; None when the model's files are not on disk
    yet (a GGUF model before its first job) or the task has no tokens (images)."""
    shape = read_model_shape(path) if path is not None else None
    if shape is None or spec.task == "image_classification":
        return None
    hp = spec.hyperparameters
    sequence = min(longest_sequence, hp.max_seq_length)
    causal = spec.task == "causal_lm"
    pairs = 2 if spec.method.objective.type in PREFERENCE_OBJECTIVES else 1  # both answers
    ranks = spec.resources.gpus
    tokens = forward_tokens(
        batch_size=-(-hp.batch_size // ranks),  # each rank's share of a step's examples
        sequence_tokens=sequence,
        budget=GPU_TOKENS_PER_FORWARD if causal else hp.batch_size * sequence * pairs,
        sequences_per_example=pairs,
    )
    padded = None if causal and hp.packing else sequence

    def at(checkpointing: bool) -> MemoryEstimate:
        precision = "bf16" if hp.precision == "auto" else hp.precision
        return estimate_memory(
            shape,
            spec.method,
            tokens=tokens,
            precision=precision,
            checkpointing=checkpointing,
            task=spec.task,
            padded_length=padded,
            base_precision=getattr(hp, "base_precision", "auto"),
        )

    def on_each_rank(checkpointing: bool) -> MemoryEstimate:
        return per_rank(at(checkpointing), shape, ranks, sharded=spec.method.type == "full")

    chosen = on_each_rank(hp.gradient_checkpointing is True)
    return chosen.as_dict() | {
        "peak_bytes_by_checkpointing": {
            "off": on_each_rank(False).peak_bytes,
            "on": on_each_rank(True).peak_bytes,
        }
    }


def per_rank(
    estimate: MemoryEstimate, shape: ModelShape, ranks: int, *, sharded: bool
) -> MemoryEstimate:
    """One rank's peak of a job on `ranks` GPUs (its share of a step's examples is already
    in `estimate`'s tokens). Data parallel keeps the whole model on each; full fine-tuning
    is sharded (FSDP): weights and trained state split `ranks` ways, plus one block gathered
    whole with its gradient (float32 both) while it computes."""
    if ranks == 1:
        return estimate
    if not sharded:
        return replace(estimate, ranks=ranks)
    block = 8 * estimate.trained_parameters // max(shape.layers, 1)
    return replace(
        estimate,
        weights_bytes=-(-estimate.weights_bytes // ranks) + block,
        trained_state_bytes=-(-estimate.trained_state_bytes // ranks),
        ranks=ranks,
        sharded=True,
    )


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in the directory's safetensors files (sharded or not), from
    their JSON headers: an 8-byte little-endian length, then that many bytes of JSON."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(length))
        for name, info in header.items():
            if name != "__metadata__" and info.get("dtype") in _PARAMETER_DTYPES:
                shapes[name] = tuple(info["shape"])
    return shapes


def _first(config: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDINGS)
