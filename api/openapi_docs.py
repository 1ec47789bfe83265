"""What the OpenAPI document says about errors: the `Problem` body, `responses(...)` for
route decorators, and `install(app)`, which finishes the document.

Every status a route can answer is documented, so a generated client or a contract tester
(schemathesis, `tests/test_openapi_contract.py`) can trust the document. A route names the
statuses its own rules give (`responses(404, 409)`); the statuses a layer in front of every
route gives are added by `install` where that layer applies, so a new route cannot forget
them: 401 where the route takes an API key, 422 where FastAPI validates its parameters or
body, 413 where it takes a body, 429 where the rate limiter counts it.

Native routes answer RFC 9457 `application/problem+json` (api/problems.py); the OpenAI
facade answers OpenAI's `{"error": {...}}` as `application/json`, with 400 for what the
native routes answer 422 (api/openai/errors.py): `openai_responses(...)` documents those.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from api.job_spec_schema import job_spec_examples, job_spec_schemas
from api.problems import MEDIA_TYPE
from api.ratelimit import EXEMPT_PATHS
from peft_engine.models import ModelRegistry, load_registry
from peft_engine.models.registry import ModelEntry
from tuneq.idempotency.service import MAX_KEY_LENGTH
from tuneq.settings import Settings

OPENAI_PREFIX = "/openai/v1"  # the facade's routes (api.openai.routes.PREFIX)
# The header as tuneq.idempotency takes it (on every POST that creates something).
IDEMPOTENCY_KEY = {
    "minLength": 1,
    "maxLength": MAX_KEY_LENGTH,
    "description": "the same key and body again: the first answer, replayed (kept "
    "TUNEQ_IDEMPOTENCY_TTL_HOURS, 24 at least); the same key with another body: 422",
}
RETRY_AFTER = {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}
_REF = "#/components/schemas/"
JSON = "application/json"
MAX_RUNTIME_SECONDS = 30 * 24 * 3600  # peft_engine.spec.JobSpec's own bound
_NOTES = frozenset({"title", "description", "examples", "default"})


class ProblemItem(BaseModel):
    """One thing at fault: a field (a dotted path such as `hyperparameters.batch_size`), a
    line of an uploaded file, or a member of an uploaded archive (its path in the archive)."""

    message: str
    field: str | None = None
    line: int | None = None
    member: str | None = None


class Problem(BaseModel):
    """An error, as RFC 9457 problem details. `code` is stable and meant for programs;
    `param` names the field at fault, `errors[]` every field or line at fault. Some
    problems carry more members (an upload's `total_errors`, a quota's limit and use)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(examples=["https://tuneq.dev/problems/invalid_request"])
    title: str = Field(examples=["Invalid request"])
    status: int = Field(ge=400, le=599, examples=[422])
    detail: str = Field(examples=["hyperparameters.batch_size: Input should be less than 1025"])
    code: str = Field(examples=["invalid_hyperparameters"])
    param: str | None = Field(None, examples=["hyperparameters.batch_size"])
    errors: list[ProblemItem] = Field(default_factory=list)


class OpenAIErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    message: str
    type: str
    param: str | None = None
    code: str | None = None
    errors: list[ProblemItem] = Field(default_factory=list)


class OpenAIError(BaseModel):
    """An error of the OpenAI-compatible facade, in OpenAI's shape."""

    error: OpenAIErrorDetail


# When each status is answered: the description a route gets unless it says more.
WHEN: dict[int, str] = {
    400: "the body could not be read as JSON",
    401: "no API key, or one that is unknown, revoked or expired (WWW-Authenticate: Bearer)",
    403: "the team is over a hard limit (the problem names it, with its limit and use)",
    404: "no such object: another team's object does not exist for you",
    409: "the object's state does not allow this now, or a request with the same "
    "Idempotency-Key is still in progress",
    413: "the body is over this deployment's size cap; refused before it is read whole",
    422: "a value is invalid: `param` and `errors[].field` name the field (or "
    "`errors[].line` the line of a file)",
    429: "over the API key's rate limit or a team quota; Retry-After says when to try again",
    503: "a service this request needs did not answer",
}

Status = int | tuple[int, str]


def responses(*statuses: Status) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a native route: each status (or `(status, why)`) answered with a
    `Problem` as application/problem+json."""
    return _documented(statuses, MEDIA_TYPE, "Problem")


def openai_responses(*statuses: Status) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a facade route: OpenAI's error object as application/json."""
    return _documented(statuses, JSON, "OpenAIError")


def _documented(statuses: tuple[Status, ...], media_type: str, schema: str) -> dict[int | str, Any]:
    documented: dict[int | str, dict[str, Any]] = {}
    for entry in statuses:
        status, why = entry if isinstance(entry, tuple) else (entry, WHEN[entry])
        documented[status] = _error_response(why, media_type, schema)
    return documented


def _error_response(why: str, media_type: str, schema: str) -> dict[str, Any]:
    return {"description": why, "content": {media_type: {"schema": {"$ref": _REF + schema}}}}


def json_body(schema: str) -> dict[str, Any]:
    """The `openapi_extra=` of a route that reads its JSON body itself (a plain dict to
    FastAPI) and validates it against the named schema of the document's components."""
    content = {JSON: {"schema": {"$ref": _REF + schema}}}
    return {"requestBody": {"required": True, "content": content}}


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the finished document at /openapi.json: the error schemas, the job spec of this
    deployment's registry, and the statuses of the layers in front of every route. The
    document is built again when the registry changes (the API reads the operator's file
    again without a restart), so a new model is in the spec's `model` enum at once."""
    built_for: list[tuple[ModelEntry, ...]] = []  # the registry the document was built for

    def openapi() -> dict[str, Any]:
        registry = getattr(app.state, "registry", None) or load_registry(
            settings.resolved_model_registry
        )
        entries = registry.entries()
        if app.openapi_schema is None or built_for != [entries]:
            app.openapi_schema = _document(app, settings, registry)
            built_for[:] = [entries]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document(app: FastAPI, settings: Settings, registry: ModelRegistry) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    _add_schemas(document)
    _add_job_spec(document, settings, registry)
    for path, _, operation in _operations(document):
        _add_layer_statuses(path, operation)
        for parameter in operation.get("parameters", ()):
            _absent_is_null(parameter)
            if parameter["name"].lower() == "idempotency-key":
                parameter["schema"] |= IDEMPOTENCY_KEY
    _add_links(document)
    return document


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    ]


def _add_schemas(document: dict[str, Any]) -> None:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (Problem, OpenAIError):
        found = model.model_json_schema(ref_template=_REF + "{model}", mode="serialization")
        schemas.update(found.pop("$defs", {}))
        schemas[model.__name__] = found
    # FastAPI's own 422 body: the app never answers it (api.problems renders a Problem).
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def _add_job_spec(document: dict[str, Any], settings: Settings, registry: ModelRegistry) -> None:
    cap = settings.max_runtime_seconds_cap or MAX_RUNTIME_SECONDS
    schemas = document["components"]["schemas"]
    schemas.update(job_spec_schemas(registry, max_runtime_seconds=cap))
    examples = job_spec_examples(registry)
    for _, _, operation in _operations(document):
        media = operation.get("requestBody", {}).get("content", {}).get(JSON, {})
        if "$ref" in media.get("schema", {}):  # json_body: the named schema, nothing of FastAPI's
            media["schema"] = {"$ref": media["schema"]["$ref"]}
            if media["schema"]["$ref"] == _REF + "JobSpec" and examples:
                media["examples"] = examples


def _add_layer_statuses(path: str, operation: dict[str, Any]) -> None:
    facade = path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")
    media_type, schema = (JSON, "OpenAIError") if facade else (MEDIA_TYPE, "Problem")
    answered = operation["responses"]

    def add(status: int) -> dict[str, Any]:
        # The facade answers OpenAI's 400 for what the native routes answer 422.
        key = str(400 if facade and status == 422 else status)
        if key not in answered or _is_fastapi_validation(answered[key]):
            answered[key] = _error_response(WHEN[int(key)], media_type, schema)
        return answered[key]

    body = operation.get("requestBody", {}).get("content", {})
    if operation.get("security"):
        add(401)
    if body or any(map(_validated, operation.get("parameters", ()))):
        add(422)
    if JSON in body:  # FastAPI's own answer to a body that is not JSON
        add(400)
    if body:
        add(413)
    if path not in EXEMPT_PATHS:
        add(429).setdefault("headers", {})["Retry-After"] = RETRY_AFTER
    for key in [k for k, response in answered.items() if _is_fastapi_validation(response)]:
        del answered[key]  # FastAPI's 422 where nothing can fail validation, or the facade's


def _absent_is_null(parameter: dict[str, Any]) -> None:
    """A parameter is null by being absent: no query, header or path value is JSON null
    (FastAPI documents `int | None` as one that may be)."""
    schema = parameter.get("schema", {})
    branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
    if len(branches) == 1 and len(schema["anyOf"]) == 2:
        del schema["anyOf"]
        schema.update(branches[0])


def _add_links(document: dict[str, Any]) -> None:
    """OpenAPI links, which clients and the stateful fuzzer follow: from what a POST created
    (201) to every operation on it, and from the team's files to a job that trains on one."""
    paths = document["paths"]
    schemas = document["components"]["schemas"]
    for path, item in paths.items():
        created = item.get("post", {}).get("responses", {}).get("201")
        if created is None:
            continue
        ref = created.get("content", {}).get(JSON, {}).get("schema", {}).get("$ref", "")
        fields = schemas.get(ref.removeprefix(_REF), {}).get("properties", {})
        for target_path, target_item in paths.items():
            name, _, rest = target_path.removeprefix(path + "/{").partition("}")
            if target_path == path or not target_path.startswith(path + "/{") or "{" in rest:
                continue
            value = f"$response.body#/{name if name in fields else 'id'}"
            for method, operation in target_item.items():
                created.setdefault("links", {})[_link_name(method, target_path)] = {
                    "operationId": operation["operationId"],
                    "parameters": {f"path.{name}": value},
                }
    listed = paths.get("/files", {}).get("get", {}).get("responses", {}).get("200")
    if listed is not None and "/jobs" in paths:
        listed.setdefault("links", {})["TrainOnFirstFile"] = {
            "operationId": paths["/jobs"]["post"]["operationId"],
            "requestBody": {"training_file": "$response.body#/data/0/id"},
        }


def _link_name(method: str, path: str) -> str:
    words = [w for w in path.replace("{", "").replace("}", "").split("/") if w]
    return method.title() + "".join(w.title().replace("_", "") for w in words)


def _validated(parameter: dict[str, Any]) -> bool:
    """Whether FastAPI can refuse the parameter: a required one that may be missing, or a
    value with a type or bounds (a path's plain string is always there, and any string)."""
    schema = {k: v for k, v in parameter.get("schema", {}).items() if k not in _NOTES}
    missable = parameter.get("required", False) and parameter["in"] != "path"
    return missable or schema not in (
        {"type": "string"},
        {"anyOf": [{"type": "string"}, {"type": "null"}]},
    )


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    content = response.get("content", {}).get(JSON, {})
    return content.get("schema", {}).get("$ref") == _REF + "HTTPValidationError"
