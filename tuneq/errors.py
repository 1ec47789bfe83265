"""Domain errors: each carries its HTTP status and a stable code; api/ renders them once.

Services raise these; routes never build HTTP errors for domain rules (STYLE habit 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorItem:
    """One thing at fault: a field (dotted path), a line of an uploaded file, or a member of
    an uploaded archive."""

    message: str
    field: str | None = None
    line: int | None = None
    member: str | None = None  # the archive member at fault (its path in the archive)

    def as_dict(self) -> dict[str, Any]:
        item: dict[str, Any] = {"message": self.message}
        if self.field is not None:
            item["field"] = self.field
        if self.line is not None:
            item["line"] = self.line
        if self.member is not None:
            item["member"] = self.member
        return item


class TuneqError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        errors: list[ErrorItem] | None = None,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []
        self.param = param
        self.extra = extra or {}


class NotFound(TuneqError):
    status, code, title = 404, "not_found", "Not found"


class Unauthorized(TuneqError):
    status, code, title = 401, "unauthorized", "Missing or invalid API key"


class InvalidRequest(TuneqError):
    status, code, title = 422, "invalid_request", "Invalid request"


def field_error(field: str, message: str) -> InvalidRequest:
    """An invalid request with one field at fault, named in the detail and as `param`."""
    return InvalidRequest(
        f"{field}: {message}", errors=[ErrorItem(message, field=field)], param=field
    )


class InvalidFile(InvalidRequest):
    code, title = "invalid_training_file", "Invalid file"


class InvalidHyperparameters(InvalidRequest):
    code, title = "invalid_hyperparameters", "Invalid hyperparameters"


class ModelNotFound(InvalidRequest):
    code, title = "model_not_found", "Unknown model"


class InsufficientGpuMemory(InvalidRequest):
    code, title = "insufficient_gpu_memory", "No GPU queue has the memory for this job"


class UnsupportedHardware(InvalidRequest):
    code, title = "unsupported_hardware", "This deployment's hardware cannot run the job"


class PayloadTooLarge(TuneqError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class Conflict(TuneqError):
    status, code, title = 409, "conflict", "Conflict"


class JobNotFinished(Conflict):
    code, title = "job_not_finished", "The job has not finished"


class AdapterNotReady(Conflict):
    code, title = "adapter_not_ready", "The job has no adapter yet"


class DiagnosticsUnavailable(Conflict):
    code, title = "diagnostics_unavailable", "The job has no per-example diagnostics"


class IdempotencyKeyReused(InvalidRequest):
    code, title = "idempotency_key_reused", "Idempotency key reused with another request"


class IdempotencyKeyInUse(Conflict):
    code, title = "idempotency_key_in_use", "A request with this idempotency key is in progress"


class Unavailable(TuneqError):
    status, code, title = 503, "unavailable", "Service unavailable"


class InferenceUnavailable(Unavailable):
    code, title = "inference_unavailable", "No worker answered"


class QuotaExceeded(TuneqError):
    """A team's quota would be passed: 429, since the same request succeeds once the team's
    use falls (jobs finish, the GPU window rolls on)."""

    status, code, title = 429, "quota_exceeded", "Quota exceeded"


class StorageQuotaExceeded(QuotaExceeded):
    """A hard cap on what a team stores: 403, since only deleting files frees it."""

    status, code, title = 403, "storage_quota_exceeded", "Storage quota exceeded"
