"""QLoRA (Dettmers et al. 2023): the frozen base in 4-bit NF4 (bitsandbytes), LoRA on top.

`base_precision: "nf4"` loads the base's linear layers as `bitsandbytes.nn.Linear4bit`
(NormalFloat4, blocks of 64, double quantisation: about 4.13 bits a weight), computing in
the job's compute dtype (peft_engine/precision.py: fp32 on a CPU, bf16/fp16 on a GPU); the
embeddings, norms and the LM head stay in the compute dtype. Then, before LoRA is applied:

- `peft.prepare_model_for_kbit_training(use_gradient_checkpointing=False)` freezes the base
  and upcasts its non-4-bit float weights to float32. Checkpointing stays the engine's own
  (peft_engine/activation_checkpointing.py, non-reentrant, after the method is applied), so
  it is never turned on twice, nor by peft's reentrant default. The upcast is undone at once
  (`load_nf4`): the engine holds every frozen float weight in the compute dtype, as for any
  other base (precision.py's `place_weights` would do it later anyway), and autocast runs
  the norms in float32. While loading, those weights (embeddings, LM head, norms) are
  briefly in float32 once: 4 bytes a parameter, for them alone.
- On a CPU, bitsandbytes (0.50) repacks a Linear4bit's weights into a bf16 inference format
  at its first forward in eval mode without gradients (where the CPU has AVX512-BF16): it
  rounds the quantisation constants to bf16 for good, so the base evaluated before training
  would not be the base trained, and it fails on layers narrower than a block (64). That
  path is turned off here (`support_avx512bf16_for_cpu`): evaluation and training both
  dequantise a layer's weights and multiply in the compute dtype.

peft wraps a Linear4bit in its own `peft.tuners.lora.bnb.Linear4bit` LoRA layer, which the
fused LoRA path (methods/lora_fused.py) leaves alone: it fuses only LoRA layers on a plain
`nn.Linear`. The adapter saves as any peft adapter (adapter weights only, no base weights);
merge it into a bf16 base, not the 4-bit one (README, "QLoRA").

Where 4-bit cannot run (no CUDA, and no bitsandbytes whose CPU backend quantises to 4 bits)
the job is refused: at submit by the API (tuneq/jobs/planning.py) unless the deployment
lists GPU queues (`installed_four_bit_missing`), and at the job's start by the engine
(`require_4bit`). Importing this module, or calling `installed_four_bit_missing`, imports
neither torch nor bitsandbytes: the API does both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_engine.errors import UnsupportedHardwareError

if TYPE_CHECKING:
    import torch

PARAM = "hyperparameters.base_precision"
NF4 = "nf4"
QLORA_EXTRA = "pip install 'tuneq[qlora]' (bitsandbytes)"
CPU_BACKEND = (0, 46)  # the first bitsandbytes whose CPU backend quantises to 4 bits


def installed_four_bit_missing() -> str | None:
    """Why this process could not run NF4, judged without importing torch or bitsandbytes
    (the API's submit check: a few milliseconds, no torch in the API process); None when it
    could: bitsandbytes >= 0.46 (a CPU backend that quantises, and CUDA), or an older one
    with a CUDA device node. `require_4bit` tests the real thing where the job runs."""
    import importlib.metadata
    import importlib.util
    import os

    try:
        found = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # hidden from imports (sys.modules[name] = None)
        found = False
    if not found:
        return f"bitsandbytes is not installed ({QLORA_EXTRA})"
    version = importlib.metadata.version("bitsandbytes")
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if major_minor >= CPU_BACKEND or os.path.exists("/dev/nvidiactl"):
        return None
    return f"bitsandbytes {version} needs CUDA for 4 bits (its CPU backend came with 0.46)"


def four_bit_missing(device_type: str | None = None) -> str | None:
    """Why this process cannot train on a 4-bit NF4 base; None when it can. `device_type`:
    the job's device ("cuda" or "cpu"); None: any device this process has (CUDA first)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return f"bitsandbytes is not installed ({QLORA_EXTRA})"
    except Exception as err:  # a broken install (a CUDA library it cannot load)
        return f"bitsandbytes cannot be loaded: {err}"
    import torch

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return None
    return _cpu_four_bit_missing()


def _cpu_four_bit_missing() -> str | None:
    """Whether bitsandbytes' CPU backend quantises to NF4 (0.46 and later; earlier releases
    need CUDA): a 64-weight round trip."""
    import bitsandbytes
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    try:
        weights = torch.linspace(-1.0, 1.0, 64).reshape(8, 8)
        packed, state = quantize_4bit(weights, quant_type=NF4, compress_statistics=True)
        error = (dequantize_4bit(packed, state) - weights).abs().max().item()
    except Exception as err:  # RuntimeError, NotImplementedError: no CPU kernel
        return (
            f"there is no CUDA device and bitsandbytes {bitsandbytes.__version__} cannot "
            f"quantise to 4 bits on the CPU ({type(err).__name__}: {err})"
        )
    if not error < 0.2:  # NF4's step is at most ~0.28 of a block's absmax: half of it, rounded
        return f"bitsandbytes {bitsandbytes.__version__}'s CPU 4-bit round trip is wrong"
    return None


def require_4bit(device: torch.device) -> None:
    """An UnsupportedHardwareError naming base_precision when `device` cannot run NF4."""
    missing = four_bit_missing(device.type)
    if missing is not None:
        raise UnsupportedHardwareError(
            f'"nf4" (QLoRA) needs a CUDA GPU with bitsandbytes, or bitsandbytes >= 0.46 on '
            f'a CPU; {missing}. Use "auto", or run the job on a GPU worker',
            param=PARAM,
        )


def nf4_config(compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for QLoRA's base, computing in `compute_dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=NF4,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def load_nf4(
    auto_class: Any, path: Path, *, dtype: torch.dtype, device: torch.device, **options: Any
) -> Any:
    """`auto_class` from `path` with its linear layers in NF4, frozen and ready for LoRA
    (see the module docstring); refused when `device` cannot run 4-bit."""
    require_4bit(device)
    from peft import prepare_model_for_kbit_training

    from peft_engine.models.loading import from_model_dir

    model = from_model_dir(
        auto_class,
        path,
        dtype=dtype,
        device=device,
        quantization_config=nf4_config(dtype),
        **options,
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():  # its float32 upcast undone (module docstring)
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    if device.type == "cpu":
        exact_cpu_path(model)
    return model


def exact_cpu_path(model: Any) -> int:
    """Turn off bitsandbytes' CPU inference repacking in every Linear4bit (module docstring);
    the number of layers."""
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model: Any) -> bool:
    """Whether `model` (a transformers or peft model) holds 4-bit weights."""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())
