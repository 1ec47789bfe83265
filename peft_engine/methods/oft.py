"""OFT (Qiu et al. 2023): a learned orthogonal rotation of each target layer's weights,
block-diagonal so it stays cheap; it preserves the angles between neurons."""

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


class OftMethod(MethodSpec):
    type: Literal["oft"] = "oft"
    # Size of the rotation blocks; the layer's input size must be a multiple of it.
    block_size: int = Field(32, ge=1, le=4096)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"


def build_oft(model: Any, spec: OftMethod, task: str) -> Any:
    from peft import OFTConfig, get_peft_model

    config = OFTConfig(
        r=0,  # the block size decides the number of blocks
        oft_block_size=spec.block_size,
        module_dropout=spec.module_dropout,
        target_modules=peft_targets(model, spec.target_modules, task),
        **peft_task_options(task),
    )
    return get_peft_model(model, config)


register(
    MethodDef(
        type="oft",
        spec=OftMethod,
        build=build_oft,
        tasks=TEXT_TASKS,
        default_learning_rate=lambda spec: 1e-3,
    )
)
