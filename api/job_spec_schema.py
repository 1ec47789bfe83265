"""The job spec (DESIGN §5) as the OpenAPI document shows it: `POST /jobs`'s request body.

Made from what validates a spec (peft_engine.spec's models, the method registry, the model
registry), so it cannot drift from it: one variant per task, its models the registry's
models that offer the task, its methods those that train the task (each told apart by
`type`), its hyperparameters those the task takes. The rules across fields that
peft_engine.spec.check_spec enforces, and the model families a method works on, are stated
with `if`/`then`. What a schema cannot state is answered 422 naming the field: adalora's
`target_r` below `init_r` (a comparison of two numbers), and what depends on the training
file (a format for the task, `batch_size` within its examples) or on the model's weights
(a `max_seq_length` within its context).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from peft_engine.methods import METHODS, MethodDef
from peft_engine.methods.common import ALL_TASKS, HEAD_TASKS, DpoObjective, SftObjective
from peft_engine.models import ModelEntry, ModelRegistry
from peft_engine.spec import (
    METADATA_KEY_PATTERN,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    Hyperparameters,
    JobSpec,
)

REF = "#/components/schemas/"
DEFAULT_TASK, DEFAULT_METHOD = "causal_lm", "lora"  # what a spec without them gets
# Options a hyperparameter takes on some tasks only; elsewhere only the value meaning "none".
TASK_OPTIONS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "pooling": (("seq_classification",), {"const": "auto"}),
    "class_weights": (("seq_classification", "image_classification"), {"type": "null"}),
    "head_learning_rate": (HEAD_TASKS, {"const": "auto"}),
    "base_precision": (("causal_lm",), {"const": "auto"}),  # QLoRA's "nf4"
}
# LoRA initialisations that change the base weights: causal_lm only, and not with DPO.
WEIGHT_CHANGING_INITS = ("pissa", "olora")


def job_spec_schemas(registry: ModelRegistry, *, max_runtime_seconds: int) -> dict[str, Any]:
    """The components the job spec needs, by name; `JobSpec` is the request body."""
    schemas: dict[str, Any] = {}
    _add_model(schemas, SftObjective, required=["type"])
    _add_model(schemas, DpoObjective, required=["type"])
    variants: dict[str, str] = {}
    for task in ALL_TASKS:
        models = [entry for entry in registry.entries() if task in entry.tasks]
        if models:
            name = _pascal(task) + "JobSpec"
            schemas[name] = _task_spec(schemas, task, models, max_runtime_seconds)
            variants[task] = REF + name
    schemas["JobSpec"] = {
        "title": "JobSpec",
        "description": "A job: its base model, task, data, method and hyperparameters. One "
        f"variant per task (`task`, {DEFAULT_TASK} when absent); unknown fields are refused.",
        "oneOf": [{"$ref": ref} for ref in variants.values()],
        "discriminator": {"propertyName": "task", "mapping": variants},
    }
    return schemas


def job_spec_examples(registry: ModelRegistry) -> dict[str, Any]:
    """Valid specs (OpenAPI Example Objects) for the tasks this deployment's models offer;
    their file ids stand for one of yours (POST /files)."""
    entries = registry.entries()
    first = {task: [e.name for e in entries if task in e.tasks][:1] for task in ALL_TASKS}
    examples: dict[str, Any] = {}
    for (model,) in filter(None, [first["causal_lm"]]):
        examples["lora"] = {
            "summary": "LoRA on a chat dataset",
            "value": {
                "model": model,
                "training_file": "file-01j9z3k6r2b8qz4x7w5v0c1m2n",
                "method": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.05},
                "hyperparameters": {"n_epochs": 3, "learning_rate": "auto", "seed": 42},
                "suffix": "support-bot",
                "metadata": {"team": "search"},
            },
        }
        examples["dpo"] = {
            "summary": "DPO on preference pairs",
            "value": {
                "model": model,
                "training_file": "file-01j9z3k6r2b8qz4x7w5v0c1m2n",
                "method": {"type": "lora", "objective": {"type": "dpo", "beta": 0.1}},
                "hyperparameters": {"packing": False},
            },
        }
    for (model,) in filter(None, [first["seq_classification"]]):
        examples["classification"] = {
            "summary": "a sentiment classifier",
            "value": {
                "model": model,
                "task": "seq_classification",
                "training_file": "file-01j9z3k6r2b8qz4x7w5v0c1m2n",
                "method": {"type": "lora", "r": 8},
                "hyperparameters": {"class_weights": "balanced", "pooling": "auto"},
            },
        }
    return examples


def _task_spec(
    schemas: dict[str, Any], task: str, models: list[ModelEntry], max_runtime_seconds: int
) -> dict[str, Any]:
    fields = JobSpec.model_json_schema(ref_template=REF + "{model}")["properties"]
    suited = {m.type: _suited(m, models) for m in METHODS.values() if task in m.tasks}
    methods = [METHODS[name] for name, on in suited.items() if on]  # a method no model suits: out
    method_refs = {m.type: REF + _add_method(schemas, m, task) for m in methods}
    hyperparameters = _add_hyperparameters(schemas, task)
    properties = {
        "model": {
            "type": "string",
            "enum": [entry.name for entry in models],
            "description": "a base model of this deployment's registry (GET /models)",
        },
        "task": {"type": "string", "const": task}
        | ({"default": DEFAULT_TASK} if task == DEFAULT_TASK else {}),
        "training_file": _without_null(fields["training_file"]) | {"description": "a file id"},
        "validation_file": fields["validation_file"] | {"description": "a file id, or null"},
        "validation_split": fields["validation_split"],
        "method": {
            "description": f"how the model is trained (`type`, {DEFAULT_METHOD} when absent)",
            "oneOf": [{"$ref": ref} for ref in method_refs.values()],
            "discriminator": {"propertyName": "type", "mapping": method_refs},
        },
        "hyperparameters": {"$ref": REF + hyperparameters},
        "max_runtime_seconds": _capped_runtime(fields["max_runtime_seconds"], max_runtime_seconds),
        "suffix": fields["suffix"],
        "metadata": {
            "type": "object",
            "description": f"at most {METADATA_MAX_KEYS} keys of up to 40 characters (filterable: "
            f"GET /jobs?metadata[key]=value), values of up to {METADATA_MAX_VALUE_CHARS}",
            "maxProperties": METADATA_MAX_KEYS,
            "propertyNames": {"pattern": METADATA_KEY_PATTERN},
            "additionalProperties": {"type": "string", "maxLength": METADATA_MAX_VALUE_CHARS},
        },
    }
    required = ["model", "training_file"] + ([] if task == DEFAULT_TASK else ["task"])
    return {
        "title": _pascal(task) + "JobSpec",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        "allOf": _cross_field_rules(methods) + _family_rules(methods, suited, models),
    }


def _suited(method: MethodDef, models: list[ModelEntry]) -> list[str]:
    """The models `method` can train: those of its families, and those of no known family."""
    families = method.families
    return [m.name for m in models if m.family is None or families is None or m.family in families]


def _family_rules(
    methods: list[MethodDef], suited: dict[str, list[str]], models: list[ModelEntry]
) -> list[dict[str, Any]]:
    """A method that works on some model families only takes only the models it suits."""
    return [
        {
            "if": {
                "properties": {
                    # `required`: a method without `type` is lora, not every method at once
                    "method": {"properties": {"type": {"const": m.type}}, "required": ["type"]}
                },
                "required": ["method"],
            },
            "then": {"properties": {"model": {"enum": suited[m.type]}}},
        }
        for m in methods
        if len(suited[m.type]) < len(models)
    ]


def _cross_field_rules(methods: list[MethodDef]) -> list[dict[str, Any]]:
    """check_spec's rules between the method and the hyperparameters, as `if`/`then`."""
    dpo = {
        "properties": {"objective": {"properties": {"type": {"const": "dpo"}}}},
        "required": ["objective"],
    }
    padded = [m.type for m in methods if m.needs_padding]
    unpacked = [dpo] + (
        [{"properties": {"type": {"enum": padded}}, "required": ["type"]}] * bool(padded)
    )
    # Virtual tokens in front of each example, or DPO's pairs side by side: never packed.
    rules = [_when_method({"anyOf": unpacked}, then_hyperparameters={"packing": {"const": False}})]
    # QLoRA ("nf4") trains LoRA alone, without the initialisations that rewrite the base.
    not_qlora = {
        "anyOf": [
            {"properties": {"type": {"not": {"const": DEFAULT_METHOD}}}, "required": ["type"]},
            {"properties": {"init": {"enum": list(WEIGHT_CHANGING_INITS)}}, "required": ["init"]},
        ]
    }
    rules.append(
        _when_method(not_qlora, then_hyperparameters={"base_precision": {"const": "auto"}})
    )
    if any(m.type == "head_only" for m in methods):
        # head_only trains the head alone, at learning_rate.
        rules.append(
            _when_method(
                {"properties": {"type": {"const": "head_only"}}, "required": ["type"]},
                then_hyperparameters={"head_learning_rate": {"const": "auto"}},
            )
        )
    return rules


def _when_method(condition: dict[str, Any], *, then_hyperparameters: dict[str, Any]) -> Any:
    return {
        "if": {"properties": {"method": condition}, "required": ["method"]},
        "then": {"properties": {"hyperparameters": {"properties": then_hyperparameters}}},
    }


def _add_method(schemas: dict[str, Any], method: MethodDef, task: str) -> str:
    """The method's schema for `task`. On causal_lm a method whose adapter can be disabled
    may train with DPO; on the other tasks only with the task's loss, and LoRA without the
    initialisations that change the base weights (peft cannot convert a task head back)."""
    schema = _model_schema(schemas, method.spec)
    dpo = task == "causal_lm" and method.disables_adapter
    objectives = [REF + "SftObjective"] + ([REF + "DpoObjective"] if dpo else [])
    schema["properties"]["objective"] = {
        "description": "what is optimised (`type`): the task's loss"
        + (", or DPO on preference pairs" if dpo else ""),
        "oneOf": [{"$ref": ref} for ref in objectives],
        "default": {"type": "sft"},
    }
    if method.type != DEFAULT_METHOD:
        schema["required"] = ["type"]
    init = schema["properties"].get("init")
    if init is not None and task != "causal_lm":
        init["enum"] = [i for i in init["enum"] if i not in WEIGHT_CHANGING_INITS]
    elif init is not None and dpo:  # DPO's reference is the base model: keep its weights
        schema["if"] = {
            "properties": {"objective": {"properties": {"type": {"const": "dpo"}}}},
            "required": ["objective"],
        }
        schema["then"] = {"properties": {"init": {"not": {"enum": list(WEIGHT_CHANGING_INITS)}}}}
    differs_by_task = method.disables_adapter or init is not None
    if differs_by_task and task != "causal_lm":
        schema["title"] += "ForClassification"
    schemas[schema["title"]] = schema
    return schema["title"]


def _add_hyperparameters(schemas: dict[str, Any], task: str) -> str:
    schema = _model_schema(schemas, Hyperparameters)
    for option, (tasks, otherwise) in TASK_OPTIONS.items():
        if task not in tasks:
            schema["properties"][option] = otherwise | {"description": f"not for {task}"}
    # A plateau rule is used only with the reduce_on_plateau schedule.
    schema["if"] = {
        "properties": {"reduce_on_plateau": {"type": "object"}},
        "required": ["reduce_on_plateau"],
    }
    schema["then"] = {
        "properties": {"lr_scheduler": {"const": "reduce_on_plateau"}},
        "required": ["lr_scheduler"],
    }
    name = schema["title"] = _pascal(task) + "Hyperparameters"
    schemas[name] = schema
    return name


def _add_model(schemas: dict[str, Any], model: type[BaseModel], *, required: list[str]) -> None:
    schema = _model_schema(schemas, model)
    schema["required"] = required
    schemas[schema["title"]] = schema


def _model_schema(schemas: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s validation schema, the models it uses added to `schemas` as they are."""
    schema = copy.deepcopy(model.model_json_schema(ref_template=REF + "{model}"))
    for name, used in schema.pop("$defs", {}).items():
        schemas.setdefault(name, used)
    return schema


def _without_null(field: dict[str, Any]) -> dict[str, Any]:
    (value,) = [branch for branch in field["anyOf"] if branch.get("type") != "null"]
    return value


def _capped_runtime(field: dict[str, Any], cap: int) -> dict[str, Any]:
    capped = copy.deepcopy(field)
    for branch in capped["anyOf"]:
        if branch.get("type") == "integer":
            branch["maximum"] = min(branch["maximum"], cap)
    capped["description"] = "training seconds over all attempts; null: the deployment's default"
    return capped


def _pascal(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))
