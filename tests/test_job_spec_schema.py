"""The job spec's schema in the OpenAPI document says exactly what POST /jobs validates.

Specs generated from the served document (schemathesis's generator, as the contract run
uses it) go through the validation POST /jobs runs before it reads any file: the spec's own
rules, the deployment's cap on runtime, the registry's model and what it and the method
support. Every spec the schema calls valid passes it, and every spec the schema calls
invalid is refused by it; the one rule a schema cannot state (adalora's target_r below
init_r, a comparison of two numbers) is left out. The contract run cannot hold POST /jobs
to this itself: there a valid spec is also checked against a file's content (see
schemathesis.toml).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from schemathesis.generation import GenerationMode

from peft_engine.errors import UserError
from peft_engine.models import load_registry
from peft_engine.prepare import check_support
from peft_engine.spec import parse_spec
from tests.conftest import write_registry
from tests.service_fixtures import make_settings
from tuneq.errors import TuneqError
from tuneq.jobs.planning import bounded_runtime

RUNTIME_CAP = 7 * 24 * 3600


def examples(count: int) -> Any:
    return settings(
        max_examples=count,
        derandomize=True,  # the same specs on every run
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A registry with a model for every task (no files needed: nothing is loaded), and the
    document the app serves for it."""
    from api.app import create_app

    home = tmp_path_factory.mktemp("spec-schema")

    def entry(tasks: list[str]) -> dict[str, Any]:
        return {"source": {"type": "local", "path": str(home / "none")}, "tasks": tasks}

    registry = write_registry(
        home / "models.json",
        {
            "chat-lm": entry(["causal_lm"]),
            "encoder": entry(["seq_classification", "token_classification"]),
            "vision": entry(["image_classification"]),
        },
    )
    configured = make_settings(
        home, model_registry=str(registry), max_runtime_seconds_cap=RUNTIME_CAP
    )
    return configured, create_app(configured).openapi()


def static_refusal(spec: Any, configured) -> str | None:
    """Why POST /jobs refuses `spec` before it reads a file (None: it does not)."""
    try:
        parsed = bounded_runtime(parse_spec(spec), configured)
        if parsed.training_file is None:
            return "training_file: required"
        check_support(parsed, load_registry(configured.model_registry).get(parsed.model))
    except (UserError, TuneqError) as err:
        return f"{getattr(err, 'param', None)}: {err}"
    return None


def job_spec_operation(document: dict[str, Any]) -> Any:
    return schemathesis.openapi.from_dict(document)["/jobs"]["POST"]


def schema_accepts(document: dict[str, Any], spec: Any) -> bool:
    return _validator(json.dumps(document["components"])).is_valid(spec)


@functools.cache
def _validator(components: str) -> Any:
    root = {"$ref": "#/components/schemas/JobSpec", "components": json.loads(components)}
    return jsonschema_rs.Draft202012Validator(root)


def adalora_rank_not_below_init(spec: Any) -> bool:
    method = spec.get("method") if isinstance(spec, dict) else None
    if not isinstance(method, dict) or method.get("type") != "adalora":
        return False
    init_r, target_r = method.get("init_r", 12), method.get("target_r", 8)
    numbers = all(
        isinstance(r, int | float) and not isinstance(r, bool) for r in (init_r, target_r)
    )
    return numbers and target_r >= init_r


def test_every_spec_the_schema_calls_valid_is_accepted(deployment):
    configured, document = deployment

    @given(case=job_spec_operation(document).as_strategy(GenerationMode.POSITIVE))
    @examples(200)
    def check(case):
        assume(not adalora_rank_not_below_init(case.body))
        refusal = static_refusal(case.body, configured)
        assert refusal is None, f"{refusal}\n{json.dumps(case.body, indent=1)}"

    check()


def test_a_method_without_its_type_is_lora_to_the_family_rules(deployment):
    # Found by the negative fuzz below: bitfit's family rule (`if method.type is bitfit`)
    # once held for a method with no type at all, and took smollm2 (llama) off the models.
    configured, document = deployment
    spec = {"method": {}, "model": "smollm2-135m-instruct", "training_file": "0"}
    assert schema_accepts(document, spec) and static_refusal(spec, configured) is None
    bitfit = {**spec, "method": {"type": "bitfit"}}
    assert not schema_accepts(document, bitfit) and static_refusal(bitfit, configured)


def test_every_spec_the_schema_calls_invalid_is_refused(deployment):
    configured, document = deployment

    @given(case=job_spec_operation(document).as_strategy(GenerationMode.NEGATIVE))
    @examples(60)
    def check(case):
        assume(not isinstance(case.body, bytes))  # not JSON at all: FastAPI's 400
        assume(not schema_accepts(document, case.body))  # a query or header was the mutation
        assert static_refusal(case.body, configured) is not None, json.dumps(case.body, indent=1)

    check()


def test_the_documents_examples_are_valid_specs(deployment):
    configured, document = deployment
    media = document["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = {name: example["value"] for name, example in media["examples"].items()}

    assert set(examples) == {"lora", "dpo", "classification"}
    for name, spec in examples.items():
        assert schema_accepts(document, spec), name
        assert static_refusal(spec, configured) is None, name


def test_each_task_is_a_variant_with_its_models_methods_and_options(deployment):
    _, document = deployment
    schemas = document["components"]["schemas"]
    variants = schemas["JobSpec"]["discriminator"]["mapping"]

    assert set(variants) == {
        "causal_lm",
        "seq_classification",
        "token_classification",
        "image_classification",
    }
    causal = schemas["CausalLmJobSpec"]["properties"]
    assert "chat-lm" in causal["model"]["enum"] and "encoder" not in causal["model"]["enum"]
    assert "head_only" not in causal["method"]["discriminator"]["mapping"]
    image = schemas["ImageClassificationJobSpec"]["properties"]
    assert set(image["method"]["discriminator"]["mapping"]) == {"lora", "full", "head_only"}
    assert schemas["CausalLmHyperparameters"]["properties"]["pooling"] == {
        "const": "auto",
        "description": "not for causal_lm",
    }
    runtime = causal["max_runtime_seconds"]["anyOf"][0]
    assert runtime["maximum"] == RUNTIME_CAP
