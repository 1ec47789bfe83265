"""LoRA (Hu et al. 2021), with peft's DoRA and rsLoRA options."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peft_engine.methods import MethodDef, register


class LoraMethod(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear": every linear layer but the output head; or explicit module names.
    target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False


def build_lora(model: Any, spec: LoraMethod, task: str) -> Any:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        use_dora=spec.use_dora,
        use_rslora=spec.use_rslora,
        bias="none",
        task_type={"causal_lm": TaskType.CAUSAL_LM}[task],
    )
    return get_peft_model(model, config)


register(MethodDef(type="lora", spec=LoraMethod, build=build_lora, tasks=("causal_lm",)))
