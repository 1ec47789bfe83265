"""OFT (Qiu et al. 2023): a learned orthogonal rotation of each target layer's weights,
block-diagonal so it stays cheap; it preserves the angles between neurons."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peft_engine.methods.common import TEXT_TASKS, PeftMethodSpec, TargetModules, build_peft
from peft_engine.methods.registry import MethodDef, register


class OftMethod(PeftMethodSpec):
    peft_config = "OFTConfig"
    peft_fields = {"oft_block_size": "block_size", "module_dropout": "module_dropout"}
    peft_fixed = {"r": 0}  # the block size decides the number of blocks

    type: Literal["oft"] = "oft"
    # Size of the rotation blocks; the layer's input size must be a multiple of it.
    block_size: int = Field(32, ge=1, le=4096)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"


register(
    MethodDef(
        type="oft",
        spec=OftMethod,
        build=build_peft,
        tasks=TEXT_TASKS,
        disables_adapter=True,
        default_learning_rate=lambda spec: 1e-3,
    )
)
