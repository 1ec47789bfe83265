"""OpenAI's `POST /fine_tuning/jobs` body, translated into a native job spec (DESIGN §5).

OpenAI's fields map onto the spec's; native features with no OpenAI field ride in one
extension member, `tuneq`: a partial native job spec merged into the translated one (the
client sends it with `extra_body={"tuneq": {...}}`), for example
`{"method": {"type": "ia3"}, "task": "causal_lm", "hyperparameters": {"max_steps": 20}}`.
A value set in both places is refused, never silently chosen.

- `hyperparameters` (deprecated by OpenAI) or `method.supervised.hyperparameters`:
  `n_epochs` and `batch_size` as they are; `learning_rate_multiplier` m sets the learning
  rate to m times the method's default (what "auto" resolves to for that method).
- `method.type` "supervised" is tuneq's training (LoRA unless `tuneq.method` says
  otherwise); "dpo" is the same with `method.objective` {"type": "dpo"} (preference pairs
  in the training file), its hyperparameters from `method.dpo.hyperparameters` (`beta` is
  the objective's); "reinforcement" is refused, naming `method.type`.
- `seed` is `hyperparameters.seed`; `suffix`, `metadata`, `validation_file` as they are;
  `integrations` must be empty (tuneq reports to no third party).

Errors name the field as the request named it: `Translation.param` maps a native field
(`hyperparameters.n_epochs`) back to where the value came from
(`method.supervised.hyperparameters.n_epochs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from peft_engine.errors import SpecError
from peft_engine.methods import METHODS
from tuneq.errors import ErrorItem, InvalidRequest, TuneqError, field_error

EXTENSION = "tuneq"
_METHOD_TYPES = ("supervised", "dpo")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(_Strict):
    """Taken as sent: the native spec checks `n_epochs` and `batch_size` (its error names the
    field as the request did), `translate` the multiplier."""

    n_epochs: Any = None
    batch_size: Any = None
    learning_rate_multiplier: Any = None


class SupervisedMethod(_Strict):
    hyperparameters: SupervisedHyperparameters | None = None


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Any = None  # taken as sent, like the others: the native spec checks it


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class Method(_Strict):
    type: str
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    # Accepted as sent, so that the refusal names `method.type` rather than its fields.
    reinforcement: dict[str, Any] | None = None


class JobCreate(_Strict):
    """What `client.fine_tuning.jobs.create(...)` sends, plus the `tuneq` extension."""

    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: SupervisedHyperparameters | None = None
    method: Method | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    tuneq: dict[str, Any] | None = None


@dataclass
class Translation:
    """The native spec, and where each of its fields came from in the request."""

    body: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def set(self, path: str, value: Any, origin: str) -> None:
        """Set the native field at the dotted `path`, sent as `origin`."""
        *parents, name = path.split(".")
        target = self.body
        for parent in parents:
            target = target.setdefault(parent, {})
        target[name] = value
        self.origins[path] = origin

    def param(self, native: str | None) -> str | None:
        """The request's name of a native field: where it, or the object holding it, came
        from; a field nobody set (a default) is named where it could be set: `tuneq.`."""
        if native is None:
            return None
        parts = native.split(".")
        for n in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:n]))
            if origin is not None:
                return ".".join([origin, *parts[n:]])
        return f"{EXTENSION}.{native}"


def renamed(error: TuneqError, translation: Translation) -> TuneqError:
    """The submission's error naming its fields as the request named them (`param`, the
    detail's leading field, each item's field)."""
    native = error.param
    error.param = translation.param(native)
    if native and error.param and error.detail.startswith(f"{native}:"):
        error.detail = error.param + error.detail[len(native) :]
    error.errors = [
        ErrorItem(item.message, translation.param(item.field), item.line) for item in error.errors
    ]
    return error


def translate(request: JobCreate) -> Translation:
    """The native spec for an OpenAI request; InvalidRequest for what cannot be honoured."""
    out = Translation()
    for name in ("model", "training_file", "validation_file", "suffix", "metadata"):
        value = getattr(request, name)
        if value is not None:
            out.set(name, value, name)
    if request.integrations:
        raise field_error("integrations", "tuneq reports to no third party; send no integrations")
    origin, hyperparameters = _hyperparameters(request)
    for name in ("n_epochs", "batch_size"):
        value = getattr(hyperparameters, name)
        if value is not None:
            out.set(f"hyperparameters.{name}", value, f"{origin}.{name}")
    if request.seed is not None:
        out.set("hyperparameters.seed", request.seed, "seed")
    extension = copy.deepcopy(request.tuneq or {})
    _merge(out, extension, prefix="")
    if request.method is not None and request.method.type == "dpo":
        _dpo_objective(out, origin, hyperparameters)
    multiplier = hyperparameters.learning_rate_multiplier
    if multiplier not in (None, "auto"):
        origin_of_rate = f"{origin}.learning_rate_multiplier"
        if isinstance(multiplier, bool) or not isinstance(multiplier, int | float):
            raise field_error(origin_of_rate, 'must be a number greater than 0, or "auto"')
        if multiplier <= 0:
            raise field_error(origin_of_rate, "must be greater than 0")
        rate = _learning_rate(float(multiplier), out.body.get("method"))
        if rate is not None:
            if "learning_rate" in out.body.get("hyperparameters", {}):
                raise _twice("hyperparameters.learning_rate", origin_of_rate)
            out.set("hyperparameters.learning_rate", rate, origin_of_rate)
    return out


def _hyperparameters(request: JobCreate) -> tuple[str, SupervisedHyperparameters]:
    """OpenAI's hyperparameters, from `method.supervised` (or `method.dpo`) or the
    deprecated top level."""
    method = request.method
    if method is not None and method.type not in _METHOD_TYPES:
        if method.type == "reinforcement":
            message = "tuneq trains supervised or dpo only, not reinforcement"
        else:
            message = (
                f"unknown method type {method.type!r}; send 'supervised' or 'dpo', and choose "
                f'a native method with {{"{EXTENSION}": {{"method": {{"type": ...}}}}}}'
            )
        raise field_error("method.type", message)
    nested, where = None, None
    if method is not None:
        for other in set(_METHOD_TYPES) - {method.type}:
            if getattr(method, other) is not None:
                raise field_error(f"method.{other}", f"method.type is {method.type!r}")
        section = getattr(method, method.type)
        nested = section.hyperparameters if section else None
        where = f"method.{method.type}.hyperparameters"
    if nested is not None and request.hyperparameters is not None:
        raise field_error("hyperparameters", f"set either hyperparameters or {where}, not both")
    if nested is not None and where is not None:
        return where, nested
    return "hyperparameters", request.hyperparameters or SupervisedHyperparameters()


def _dpo_objective(out: Translation, origin: str, hyperparameters: Any) -> None:
    """OpenAI's DPO as the native objective, on the method (LoRA unless the extension gives
    one); the extension may not give the method an objective of its own."""
    method = out.body.get("method")
    if isinstance(method, dict) and "objective" in method:
        raise _twice("method.objective", "method.type")
    out.set("method.objective", {"type": "dpo"}, origin)
    beta = getattr(hyperparameters, "beta", None)
    if beta not in (None, "auto"):
        out.set("method.objective.beta", beta, f"{origin}.beta")


def _merge(out: Translation, extension: dict[str, Any], *, prefix: str) -> None:
    """Merge the extension's fields into the spec; a field set twice is refused. Objects
    merge member by member, except `method`, which the extension gives whole."""
    for name, value in extension.items():
        path = f"{prefix}{name}"
        current = _get(out.body, path)
        if isinstance(value, dict) and isinstance(current, dict) and path != "method":
            _merge(out, value, prefix=f"{path}.")
        elif current is not None:
            raise _twice(path, out.origins.get(path, path))
        else:
            out.set(path, value, f"{EXTENSION}.{path}")


def _get(body: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(body, dict):
            return None
        body = body.get(part)  # type: ignore[assignment]
    return body


def _learning_rate(multiplier: float, method: Any) -> float | None:
    """`multiplier` times the method's default learning rate; None when the method is not
    valid (the submission then refuses it, naming its field)."""
    method = method if isinstance(method, dict) else {}
    definition = METHODS.get(method.get("type", "lora"))
    if definition is None:
        return None
    try:
        spec = definition.spec.model_validate(method)
    except (ValidationError, SpecError):  # a rule across fields (AdaLoRA's ranks) is a SpecError
        return None
    return multiplier * definition.default_learning_rate(spec)


def _twice(native: str, first: str) -> InvalidRequest:
    extension = f"{EXTENSION}.{native}"
    return field_error(extension, f"already set by {first}; set it in one place")
