"""How a spec's validation errors read: one field named per error, in a person's words.

pydantic reports an error per union member it tried and names the members in its paths;
this keeps the most telling error per field and drops the members' names.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from peft_engine.errors import SpecError
from peft_engine.methods import METHODS

# A job's metadata, capped as Stripe caps its own: at most 50 keys, each at most 40 characters
# (letters, digits and `_ . : -`, so that `GET /jobs?metadata[k]=v` can name it), each value
# at most 500 characters.
METADATA_MAX_KEYS, METADATA_MAX_VALUE_CHARS = 50, 500
METADATA_KEY_PATTERN = r"^[\w.:-]{1,40}$"
METHOD_TYPES = tuple(METHODS)


def spec_error_from(exc: ValidationError) -> SpecError:
    # pydantic reports one error per union member tried; keep the most telling one per field.
    by_field: dict[str, str] = {}
    for err in exc.errors():
        loc = err["loc"]
        if loc[:1] == ("method",) and len(loc) > 1:
            loc = ("method", *loc[2:])  # drop the union tag pydantic inserts ("lora")
        if loc[:2] == ("method", "objective") and len(loc) > 2:
            loc = ("method", "objective", *loc[3:])  # and the objective's ("dpo")
        loc = loc[:-1] if loc[-1:] == ("[key]",) else loc  # a metadata key: name the key
        field = ".".join(str(p) for p in loc if not _is_union_branch(p))
        message = _friendly_message(err)
        if field not in by_field or by_field[field].startswith("Input should be 'auto'"):
            by_field[field] = message
    field, message = next(iter(by_field.items()))
    if len(by_field) > 1:
        message += f" (and {len(by_field) - 1} more: {', '.join(list(by_field)[1:4])})"
    return SpecError(message, param=field or None)


def _friendly_message(err: Any) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["loc"][:1] == ("metadata",):
        return _metadata_message(err)
    if err["loc"][-1:] == ("objective",):
        return _objective_message(err)
    if err["type"] == "union_tag_invalid":
        return f"unknown method {err['input'].get('type')!r}; supported: {', '.join(METHOD_TYPES)}"
    if err["type"] == "union_tag_not_found":
        return 'must be an object such as {"type": "lora", "r": 16}'
    return err["msg"]


def _metadata_message(err: Any) -> str:
    if err["loc"][-1:] == ("[key]",):
        return "a key is 1 to 40 characters: letters, digits and _ . : -"
    if err["type"] == "too_long" and len(err["loc"]) == 1:
        return f"at most {METADATA_MAX_KEYS} keys"
    return err["msg"]


def _objective_message(err: Any) -> str:
    if err["type"] == "union_tag_invalid":
        return f"unknown objective {err['input'].get('type')!r}; supported: sft, dpo"
    if err["type"] == "union_tag_not_found":
        return 'must be an object such as {"type": "dpo", "beta": 0.1}'
    return err["msg"]


def _is_union_branch(part: Any) -> bool:
    # pydantic names the union member it tried ("int", "literal['auto']"): not a field.
    return isinstance(part, str) and (
        part in {"int", "float", "str", "bool", "list[str]", "constrained-float"}
        or part.startswith(("literal[", "list[", "function-", "constrained-"))
    )
