"""Base models kept in memory between jobs, so a worker's next job skips the disk load.

A worker runs one job after another in one process; most jobs train the same few base
models. `ResidentModels` keeps the pristine weights of the last ones it loaded (bounded by
count and by bytes, least recently used out first) and gives each job its own model built
from them:

- the module tree (config included) is deep-copied per job, because jobs change it: peft
  injects adapter modules in place, the engine switches the attention implementation;
- the weight tensors are shared with the resident copy when the job's method freezes every
  base weight and never writes one (`shares_base_weights`), and copied otherwise (`full`,
  `bitfit`, `layerwise_unfreeze`, LoRA's PiSSA/OLoRA init, any method not listed). Tied
  weights (an LM head tied to the embeddings) stay tied in both cases;
- a resident model whose tensors were written in place anyway (their version counters
  moved) is dropped and loaded again, so a mistake in that list cannot leak into the next
  job.

Only the pretrained part is kept: a classification task's new head is built per job, with
the job's seed. Tokenizers are kept too and shared: the engine only reads them.

The cache is active only inside `with models.active():` (the worker wraps each job in it);
without one, `peft_engine.train` loads from disk exactly as before. The loaders ask for it
through `resident_loader(method)`. Importing this module does not import torch.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# Methods whose builder freezes every base weight and writes none: their jobs share the
# resident tensors. Anything else (a method added later included) gets its own copy.
_FROZEN_BASE_METHODS = frozenset(
    {
        "adalora",
        "bottleneck_adapter",
        "head_only",  # the body is frozen; only the new per-job head trains
        "ia3",
        "loha",
        "lokr",
        "oft",
        "p_tuning",
        "prefix_tuning",
        "prompt_tuning",
        "vera",
    }
)
# LoRA initialisations that rewrite the base weights they start from.
_WEIGHT_REWRITING_LORA_INITS = frozenset({"pissa", "olora"})

# What `load_model` reports about each base-model load: (message, data).
LoadReport = Callable[[str, dict[str, Any]], None]


def shares_base_weights(method: Any) -> bool:
    """Whether a job with this method spec may train on the resident tensors themselves."""
    if method.type == "lora":
        return method.init not in _WEIGHT_REWRITING_LORA_INITS
    return method.type in _FROZEN_BASE_METHODS


@dataclass(frozen=True)
class _Key:
    """What makes two loads give the same weights: the loader, its options, the files."""

    loader: str
    path: str
    files: tuple[tuple[str, int, int], ...]  # (name, size, mtime) of the directory's files
    dtype: str
    options: tuple[tuple[str, Any], ...]


@dataclass
class _Resident:
    model: nn.Module
    nbytes: int
    versions: list[int] = field(default_factory=list)  # of its tensors, when it was loaded


@dataclass
class _Active:
    models: ResidentModels
    report: LoadReport | None


_ACTIVE: ContextVar[_Active | None] = ContextVar("tuneq_resident_models", default=None)


class ResidentModels:
    """A bounded, least-recently-used cache of pristine base models and their tokenizers.

    `max_models` bounds how many models (and, separately, tokenizers) are kept; `max_bytes`
    the weights' total size. A model larger than `max_bytes` is loaded but never kept.
    """

    def __init__(self, *, max_models: int = 1, max_bytes: int | None = None) -> None:
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._models: OrderedDict[_Key, _Resident] = OrderedDict()
        self._tokenizers: OrderedDict[_Key, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._models)

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._models.values())

    @contextmanager
    def active(self, report: LoadReport | None = None) -> Iterator[ResidentModels]:
        """Make this cache the one the loaders use within the block (one job, in the worker).

        `report(message, data)` hears where each base model came from and how long it took.
        """
        token = _ACTIVE.set(_Active(self, report))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def load(
        self,
        loader: Callable[..., nn.Module],
        path: Path,
        *,
        dtype: torch.dtype | None,
        device: str | torch.device,
        share: bool,
        **options: Any,
    ) -> nn.Module:
        """The model `loader(path, dtype=dtype, device=device, **options)` gives, for one job.

        `share`: the job may use the resident tensors themselves (its method writes none).
        """
        import torch

        dtype = dtype or torch.float32
        started = time.perf_counter()
        key = _key(loader, path, dtype, options)
        entry = self._lookup(key)
        if entry is None:
            model = loader(path, dtype=dtype, device="cpu", **options)
            entry = self._keep(key, model)
            if entry is None:  # too big to keep: the job has it to itself
                _report("loaded from disk", "disk", started)
                return model.to(device)
            how, source = "loaded from disk (now resident)", "disk"
        else:
            how, source = "taken from memory", "resident"
        job_model = _job_copy(entry.model, torch.device(device), share=share)
        _report(how, source, started)
        return job_model

    def tokenizer(self, loader: Callable[[Path], Any], path: Path) -> Any:
        """The tokenizer `loader(path)` gives, kept and shared: the engine only reads it."""
        key = _key(loader, path, None, {})
        if key in self._tokenizers:
            self._tokenizers.move_to_end(key)
            return self._tokenizers[key]
        tokenizer = loader(path)
        if self.max_models > 0:
            self._tokenizers[key] = tokenizer
            while len(self._tokenizers) > self.max_models:
                self._tokenizers.popitem(last=False)
        return tokenizer

    def _lookup(self, key: _Key) -> _Resident | None:
        entry = self._models.get(key)
        if entry is None:
            return None
        if _versions(entry.model) != entry.versions:
            # A job wrote the weights it was only meant to read: they are pristine no more.
            del self._models[key]
            return None
        self._models.move_to_end(key)
        return entry

    def _keep(self, key: _Key, model: nn.Module) -> _Resident | None:
        """Keep a freshly loaded model, evicting the least recently used ones to fit."""
        nbytes = _nbytes(model)
        fits = self.max_bytes is None or nbytes <= self.max_bytes
        if self.max_models < 1 or not fits:
            return None
        _own_memory(model)  # resident in RAM, not pages of a mapped file that may go
        entry = _Resident(model, nbytes, _versions(model))
        self._models[key] = entry
        while len(self._models) > self.max_models or (
            self.max_bytes is not None and self.nbytes > self.max_bytes
        ):
            self._models.popitem(last=False)
        return entry


@dataclass(frozen=True)
class ResidentLoader:
    """The active cache as one job's loaders use it: it knows whether they may share."""

    models: ResidentModels
    share: bool

    def load(self, loader: Callable[..., nn.Module], path: Path, **options: Any) -> nn.Module:
        """`ResidentModels.load` with this job's `share`."""
        return self.models.load(loader, path, share=self.share, **options)


def resident_loader(method: Any) -> ResidentLoader | None:
    """The active cache for a job with this method spec; None when no cache is active."""
    active = _ACTIVE.get()
    if active is None:
        return None
    return ResidentLoader(active.models, shares_base_weights(method))


def active_models() -> ResidentModels | None:
    active = _ACTIVE.get()
    return None if active is None else active.models


def _report(how: str, source: str, started: float) -> None:
    """Tell the active cache's listener (the worker's job events) how the model came."""
    active = _ACTIVE.get()
    if active is not None and active.report is not None:
        seconds = time.perf_counter() - started
        data = {"base_model_source": source, "base_model_seconds": round(seconds, 3)}
        active.report(f"base model {how} in {seconds:.2f}s", data)


def _key(
    loader: Callable[..., Any], path: Path, dtype: torch.dtype | None, options: dict[str, Any]
) -> _Key:
    path = Path(path).resolve()
    return _Key(
        loader=f"{loader.__module__}.{loader.__qualname__}",
        path=str(path),
        files=_file_stamps(path),
        dtype=str(dtype),
        options=tuple(sorted(options.items())),
    )


def _file_stamps(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """The directory's files as (name, size, mtime): weights replaced in place mean a new key."""
    stamps = []
    for entry in sorted(directory.iterdir()):
        if entry.is_file():
            stat = entry.stat()
            stamps.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer once (a tied weight is one tensor under two names)."""
    yield from model.parameters()
    yield from model.buffers()


def _nbytes(model: nn.Module) -> int:
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in _tensors(model)}
    return sum(sizes.values())


def _versions(model: nn.Module) -> list[int]:
    return [t._version for t in _tensors(model)]


def _own_memory(model: nn.Module) -> None:
    """Copy tensors that may be pages of the safetensors file into memory of their own.

    Assigning `.data` keeps each tensor object, so ties and aliases survive.
    """
    import torch

    with torch.no_grad():
        for tensor in _tensors(model):
            tensor.data = tensor.data.clone()


def _job_copy(template: nn.Module, device: torch.device, *, share: bool) -> nn.Module:
    """A deep copy of the module tree whose parameters are shared with `template` or copied.

    Buffers are always copied: they are small, and some change in a forward pass (batch-norm
    statistics). deepcopy's memo maps each resident tensor to the job's, so every module
    that referred to one tensor (tied weights) refers to the same new one.
    """
    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    with torch.no_grad():
        for tensor in _tensors(template):
            is_parameter = isinstance(tensor, nn.Parameter)
            if share and is_parameter and device.type == "cpu":
                data = tensor.detach()  # the same storage: a frozen weight is only read
            else:
                data = tensor.detach().to(device, copy=True)
            memo[id(tensor)] = (
                nn.Parameter(data, requires_grad=tensor.requires_grad) if is_parameter else data
            )
    return copy.deepcopy(template, memo)
