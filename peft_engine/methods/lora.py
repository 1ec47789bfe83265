"""LoRA (Hu et al. 2021), with peft's DoRA and rsLoRA options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from peft_engine.methods.common import ALL_TASKS, PeftMethodSpec, TargetModules, build_peft
from peft_engine.methods.registry import MethodDef, register
from peft_engine.methods.weights import INITIAL_ADAPTER_ATTRIBUTE


class LoraMethod(PeftMethodSpec):
    peft_config = "LoraConfig"
    peft_fields = {
        "r": "r",
        "lora_alpha": "alpha",
        "lora_dropout": "dropout",
        "use_dora": "use_dora",
        "use_rslora": "use_rslora",
    }
    peft_fixed = {"bias": "none"}

    type: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    # How B·A starts: "default" (A Kaiming-uniform, B zero), "gaussian" (A Gaussian), or
    # from the weights themselves: "pissa" (the top singular vectors, Meng et al. 2024) or
    # "olora" (a QR decomposition, Büyükakyüz 2024). Those two move the principal part out
    # of the base weights while training; the output is converted back to a plain LoRA
    # adapter (rank 2r) on the original base model, so it loads like any other.
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"

    def peft_options(self, model: Any, task: str) -> dict[str, Any]:
        init = True if self.init == "default" else self.init  # peft's True: its default init
        return {**super().peft_options(model, task), "init_lora_weights": init}


def build_lora(model: Any, spec: LoraMethod, task: str) -> Any:
    from peft_engine.methods.lora_fused import fuse_lora

    model = build_peft(model, spec, task)
    fuse_lora(model)  # one autograd function a layer, dropout inside: faster, less memory
    if spec.init in ("pissa", "olora"):
        _keep_initial_adapter(model, spec.init)
    return model


def _keep_initial_adapter(model: Any, init: str) -> None:
    """Save the adapter as initialised, which the output's conversion subtracts (peft's
    `path_initial_model_for_weight_conversion`); saved as a plain LoRA init, as peft asks."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="tuneq-lora-init-"))
    atexit.register(shutil.rmtree, folder, True)
    config = model.peft_config["default"]
    config.init_lora_weights = True
    try:
        model.save_pretrained(folder / "initial")
    finally:
        config.init_lora_weights = init
    setattr(model, INITIAL_ADAPTER_ATTRIBUTE, str(folder / "initial"))


register(
    MethodDef(
        type="lora",
        spec=LoraMethod,
        build=build_lora,
        tasks=ALL_TASKS,
        disables_adapter=True,
        # LoRA's usual rate; large ranks make bigger updates, so a smaller step.
        default_learning_rate=lambda spec: 2e-4 if spec.r <= 64 else 1e-4,
        # a small encoder under a new head, often one epoch: bigger steps (bench/quality.py)
        head_task_learning_rate=lambda spec: 1e-3 if spec.r <= 64 else 5e-4,
    )
)
