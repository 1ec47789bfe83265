"""LoRA (Hu et al. 2021), with peft's DoRA and rsLoRA options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peft_engine.methods import MethodDef, register
from peft_engine.methods.common import (
    TEXT_TASKS,
    MethodSpec,
    TargetModules,
    peft_targets,
    peft_task_options,
)


class LoraMethod(MethodSpec):
    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    # How B·A starts: "default" (A Kaiming-uniform, B zero) or "gaussian" (A Gaussian).
    init: Literal["default", "gaussian"] = "default"


def build_lora(model: Any, spec: LoraMethod, task: str) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=peft_targets(model, spec.target_modules, task),
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        init_lora_weights=True if spec.init == "default" else spec.init,
        bias="none",
        **peft_task_options(task),
    )
    return get_peft_model(model, config)


register(
    MethodDef(
        type="lora",
        spec=LoraMethod,
        build=build_lora,
        tasks=TEXT_TASKS,
        # LoRA's usual rate; large ranks make bigger updates, so a smaller step.
        default_learning_rate=lambda spec: 2e-4 if spec.r <= 64 else 1e-4,
    )
)
