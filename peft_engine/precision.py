"""Mixed precision: the dtype the forward passes compute in, and what stays in float32.

    fp32   no autocast, every weight in float32 ("auto" on a CPU)
    bf16   autocast to bfloat16 ("auto" on a CUDA device that supports it; a CPU runs it too)
    fp16   autocast to float16, the loss scaled by a GradScaler ("auto" on an older CUDA device)

In bf16 and fp16 the frozen weights are held in the compute dtype (half the memory), while
the trained parameters, every one the optimizer updates, are float32 master weights: an
update smaller than bf16's rounding step is not lost, and AdamW's moments, made like their
parameters, are float32 too. Autocast runs the matrix multiplications in the compute dtype
and keeps softmax, norms and the loss in float32. The output is saved from the trained
float32 parameters, so an adapter is a float32 peft adapter whatever the mode.

A mode the device cannot run is refused (`hyperparameters.precision`), never replaced by
another: a job asking for bf16 gets bf16 or an error.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from peft_engine.errors import SpecError

Mode = Literal["fp32", "bf16", "fp16"]
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
# Methods that train the base model's own weights at large: the base loads in float32, as
# those are master weights (loading them in bf16 first would round them); what they leave
# frozen (the embeddings of layer-wise unfreezing) is cast down afterwards.
TRAINS_BASE_WEIGHTS = frozenset({"full", "layerwise_unfreeze"})


@dataclass(frozen=True)
class Precision:
    """A job's compute mode on its device, and the GradScaler fp16 needs (else None)."""

    mode: Mode
    device: torch.device
    scaler: Any = None  # torch.amp.GradScaler in fp16

    @property
    def compute_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.mode]

    def load_dtype(self, method_type: str) -> torch.dtype:
        """The dtype the base model loads in: the compute dtype, unless the method trains
        the base weights themselves (TRAINS_BASE_WEIGHTS)."""
        return torch.float32 if method_type in TRAINS_BASE_WEIGHTS else self.compute_dtype

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context every forward pass of the job runs in: training, evaluation, loss."""
        return autocast_to(self.device, self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size before clipping reads them (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; in fp16 skipped when a gradient overflowed (the scale halves)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def scaler_state(self) -> dict[str, Any]:
        return dict(self.scaler.state_dict()) if self.scaler is not None else {}

    def load_scaler_state(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def describe(self) -> str:
        if self.mode == "fp32":
            return f"precision fp32 on {self.device.type}"
        scaled = ", loss scaled by a GradScaler" if self.scaler is not None else ""
        return (
            f"precision {self.mode} on {self.device.type}: autocast to {self.mode}{scaled}; "
            "trained parameters and optimizer state in float32, frozen weights in "
            f"{self.mode}"
        )


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The job's mode on `device`: "auto" is the fastest sound one; an explicit mode the
    device cannot run is a SpecError naming hyperparameters.precision."""
    mode = auto_mode(device) if requested == "auto" else requested
    if mode != "fp32" and not autocast_supported(device, COMPUTE_DTYPES[mode]):
        raise SpecError(
            f"{mode} needs a device that computes in {mode}, and this {_device_name(device)} "
            'does not; use "fp32" or "auto"',
            param="hyperparameters.precision",
        )
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return Precision(mode, device, scaler)  # type: ignore[arg-type]


def resumed_precision(
    requested: str, device: torch.device, recorded: str | None
) -> tuple[Precision, str | None]:
    """The mode of a job resumed from a checkpoint that trained in `recorded`, and a note
    for the job's events when it is not the mode "auto" picks here. "auto" keeps the
    checkpoint's mode where this device runs it (a job begun in bf16 on a GPU goes on in
    bf16 on a CPU, whose autocast takes bf16), so the run stays the run it was; where it
    cannot, "auto" picks this device's mode and says so. An explicit mode is the spec's."""
    if requested != "auto" or not recorded or recorded == auto_mode(device):
        return resolve_precision(requested, device), None
    try:
        return resolve_precision(
            recorded, device
        ), f"precision {recorded}, as the checkpoint trained"
    except SpecError:
        here = auto_mode(device)
        return resolve_precision(here, device), (
            f"the checkpoint trained in {recorded}, which this {device.type} cannot run: "
            f"going on in {here}, so the losses from here differ slightly from the run's"
        )


def auto_mode(device: torch.device) -> Mode:
    if device.type != "cuda":
        return "fp32"  # a CPU runs bf16 when asked; by default it keeps the exact mode
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether autocast on `device` computes in `dtype`: bf16 on CUDA where the device has it,
    fp16 on any CUDA device; elsewhere, whether this torch's autocast for the device takes the
    dtype (it warns and turns itself off for one it does not)."""
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        return False  # e.g. the meta device
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            probe = torch.ones(1, 1, device=device) @ torch.ones(1, 1, device=device)
    return probe.dtype == dtype


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on `device`; a no-op for float32 (or None)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def place_weights(model: Any, optimizer: torch.optim.Optimizer, precision: Precision) -> None:
    """Every parameter the optimizer updates in float32 (master weights), every other one in
    the compute dtype. Layer-wise unfreezing's later layers are in the optimizer from the
    start, so they are float32 before they train. The Parameter objects stay the same."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for param in model.parameters():
        if not param.is_floating_point():
            continue
        dtype = torch.float32 if id(param) in trained else precision.compute_dtype
        if param.dtype != dtype:
            param.data = param.data.to(dtype)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU ({torch.cuda.get_device_name(device)})"
    return device.type.upper()
