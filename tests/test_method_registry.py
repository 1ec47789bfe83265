"""The method registry: one method a type, and every method registered whichever module of
`peft_engine.methods` a process imports first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peft_engine.methods import METHODS, MethodDef, method_for, register
from peft_engine.methods.registry import METHODS as REGISTRY


def _like(method: MethodDef, type_: str) -> MethodDef:
    return MethodDef(
        type=type_,
        spec=method.spec,
        build=method.build,
        tasks=method.tasks,
        default_learning_rate=method.default_learning_rate,
    )


def test_the_package_serves_the_registry() -> None:
    assert METHODS is REGISTRY
    assert method_for("lora") is METHODS["lora"]
    for type_, method in METHODS.items():
        assert method.type == type_ == method.spec.model_fields["type"].default


def test_a_second_method_of_the_same_type_is_refused() -> None:
    lora = METHODS["lora"]
    before = dict(METHODS)
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register(_like(lora, "lora"))
    assert dict(METHODS) == before
    assert method_for("lora") is lora


def test_a_new_type_registers_once() -> None:
    new = _like(METHODS["lora"], "x-new")
    try:
        assert register(new) is new
        assert method_for("x-new") is new
        with pytest.raises(ValueError, match="already registered"):
            register(_like(METHODS["full"], "x-new"))
        assert method_for("x-new") is new
    finally:
        METHODS.pop("x-new", None)


@pytest.mark.parametrize(
    "first",
    [
        "peft_engine.methods",
        "peft_engine.methods.registry",
        "peft_engine.methods.vera",
        "peft_engine.methods.bottleneck",
    ],
)
def test_every_method_registers_whichever_module_comes_first(first: str) -> None:
    code = (
        f"import importlib, sys; importlib.import_module({first!r})\n"
        "from peft_engine.methods.registry import METHODS\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(','.join(METHODS))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    )
    assert result.stdout.strip().split(",") == list(METHODS)
