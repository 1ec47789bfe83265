"""Errors the engine raises for the user's faults, each with a stable code.

The service maps `code` onto a failed job's `error.code`; the CLI prints `str(err)` on one
line and exits 2. Anything else that escapes the engine is a bug (internal_error).
"""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A fault in the spec, the data or the model choice: the user can fix it."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return f"{self.param}: {self.message}" if self.param else self.message


class SpecError(UserError):
    code = "invalid_hyperparameters"


class ModelNotFoundError(UserError):
    code = "model_not_found"


class UnsupportedHardwareError(UserError):
    """The job asks for what this machine cannot run (a 4-bit base without CUDA or a
    bitsandbytes that quantises on the CPU): another worker's device, or another setting."""

    code = "unsupported_hardware"


class TrainingDivergedError(UserError):
    """The training loss became NaN or infinite: the weights would be garbage from here on.
    Raised before the optimizer step that would apply it, so every checkpoint is sound."""

    code = "training_diverged"


@dataclass(frozen=True)
class LineError:
    """One problem in a data file: 1-based line number, the field at fault, what is wrong."""

    line: int
    message: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", {self.field}" if self.field else "")
        return f"{where}: {self.message}"


class DataError(UserError):
    """A data file that cannot be used; `errors` holds the first line-numbered problems."""

    code = "invalid_training_file"

    def __init__(
        self,
        message: str,
        *,
        param: str = "training_file",
        errors: list[LineError] | None = None,
        total_errors: int | None = None,
    ) -> None:
        super().__init__(message, param=param)
        self.errors = errors or []
        self.total_errors = total_errors if total_errors is not None else len(self.errors)
        if param == "validation_file":
            self.code = "invalid_validation_file"

    def __str__(self) -> str:
        text = f"{self.param}: {self.message}"
        if self.errors:
            text += f": {self.errors[0]}"
            more = self.total_errors - 1
            if more > 0:
                lines = ", ".join(str(e.line) for e in self.errors[1:6])
                text += f" (and {more} more: line{'s' if more > 1 else ''} {lines}"
                text += ", ...)" if more > 5 else ")"
        return text
