"""What the method modules share: strict spec models, targets, task types, model families,
and the one builder of the methods peft implements."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

# A method's target layers: "all-linear" (every linear layer but the output head) or names.
TargetModules = Literal["all-linear"] | Annotated[list[str], Field(min_length=1)]

# peft's task type per task; None: a plain PeftModel (its forward passes inputs through).
PEFT_TASK_TYPES: dict[str, str | None] = {
    "causal_lm": "CAUSAL_LM",
    "seq_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "image_classification": None,
}
TEXT_TASKS = ("causal_lm", "seq_classification", "token_classification")
HEAD_TASKS = ("seq_classification", "token_classification", "image_classification")
ALL_TASKS = ("causal_lm", *HEAD_TASKS)
# The new task head of a classification model (peft_engine.tasks builds it): always trained.
TASK_HEAD = "classifier"

# Model families (config.json's model_type) by layout, for methods that name the families
# they work on (MethodDef.families).
BERT_LIKE = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def peft_task_options(task: str) -> dict[str, Any]:
    """peft config options that make a method train and save the task head."""
    task_type = PEFT_TASK_TYPES[task]
    if task_type is None:  # peft knows no image task type: name the head to train and save
        return {"task_type": None, "modules_to_save": [TASK_HEAD]}
    return {"task_type": task_type}


def peft_targets(model: Any, targets: str | list[str], task: str) -> str | list[str]:
    """peft's target_modules for a method's `target_modules`.

    "all-linear" on a classification model names every linear layer of the body: peft's own
    "all-linear" leaves out a causal LM's output layer but not a task head, and the head is
    trained whole (modules_to_save), so it must not get an adapter as well. A convolutional
    body without linear layers (MobileNetV2) gets its pointwise convolutions instead (1x1,
    not grouped): each is a linear map of a pixel's channels, what a linear layer is to a
    token; the 3x3 ones are depthwise (one filter a channel) and stay frozen.
    """
    if targets != "all-linear" or task not in HEAD_TASKS:
        return targets
    from torch import nn

    from peft_engine.errors import SpecError

    body = [(n, m) for n, m in model.named_modules() if n and not n.startswith(TASK_HEAD)]
    names = [name for name, module in body if isinstance(module, nn.Linear)]
    if not names:
        names = [name for name, module in body if _pointwise(module)]
    if not names:
        raise SpecError(
            f"{type(model.body).__name__} has neither linear layers nor 1x1 convolutions for "
            "'all-linear'; name the layers to adapt in target_modules",
            param="method.target_modules",
        )
    return names


def _pointwise(module: Any) -> bool:
    from torch import nn

    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def unfreeze_task_head(model: Any, task: str) -> int:
    """Make the task head of a classification model trainable; the number of its parameters."""
    if task not in HEAD_TASKS:
        return 0
    head = getattr(model, TASK_HEAD)
    count = 0
    for parameter in head.parameters():
        parameter.requires_grad_(True)
        count += parameter.numel()
    return count


class MethodTrainer:
    """What a method does during training, beyond building the model. Every hook is optional.

    Steps are 1-based. `before_step(step)` runs before each optimizer step's forward passes,
    and once more right after a resume with the step about to run, so a schedule that is a
    function of the step (unfreezing) is restored by construction. State that is not (a rank
    budget's importance scores) goes through `state()`/`load_state()` into the checkpoint.
    """

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]] | None:
        return None  # None: the loop's default groups (decay on matrices only)

    def before_step(self, step: int) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        return None

    def extra_loss(self) -> Any:
        return None  # a tensor added to the step's loss, or None

    def state(self) -> dict[str, Any]:
        return {}  # tensors by name, saved in the checkpoint (safetensors)

    def load_state(self, tensors: dict[str, Any]) -> None:
        return None


class SftObjective(BaseModel):
    """Supervised fine-tuning: the task's own loss (next-token loss for causal_lm)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["sft"] = "sft"


class DpoObjective(BaseModel):
    """Direct preference optimisation (Rafailov et al. 2023) on preference pairs.

    The reference model is the base model with the adapter disabled, so only methods whose
    adapter can be switched off (`MethodDef.disables_adapter`) train with it. `beta` is how
    far from the reference the policy may move (the reward's scale); `label_smoothing` the
    share of pairs taken to be mislabelled (conservative DPO, 0 = plain DPO); `sft_weight`
    adds that times the preferred answer's next-token loss (per token) to each pair's loss.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0.0, le=10.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    sft_weight: float = Field(0.0, ge=0.0, le=10.0)


def _objective_type(value: Any) -> Any:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


Objective = Annotated[
    Annotated[SftObjective, Tag("sft")] | Annotated[DpoObjective, Tag("dpo")],
    Discriminator(_objective_type),
]
OBJECTIVE_TYPES = ("sft", "dpo")


class MethodSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # What the method's parameters are trained for: the task's loss, or a preference loss.
    objective: Objective = SftObjective()


class PeftMethodSpec(MethodSpec):
    """The spec of a method peft implements: how it becomes peft's config is data.

    `peft_config` names peft's config class (peft is imported only when a model is built),
    `peft_fields` maps peft's option names to this spec's fields, and `peft_fixed` holds the
    options every job of the method sets. A spec's `target_modules` are resolved for the model.
    """

    peft_config: ClassVar[str]
    peft_fields: ClassVar[dict[str, str]] = {}
    peft_fixed: ClassVar[dict[str, Any]] = {}

    def peft_options(self, model: Any, task: str) -> dict[str, Any]:
        options = {**self.peft_fixed}
        options.update({option: getattr(self, field) for option, field in self.peft_fields.items()})
        if "target_modules" in type(self).model_fields:
            options["target_modules"] = peft_targets(model, self.target_modules, task)
        return {**options, **peft_task_options(task)}


def build_peft(model: Any, spec: PeftMethodSpec, task: str) -> Any:
    """`model` wrapped by peft (a PeftModel) with the method `spec` describes."""
    import peft

    config_class = getattr(peft, spec.peft_config)
    return peft.get_peft_model(model, config_class(**spec.peft_options(model, task)))


class LycorisSpec(PeftMethodSpec):
    """LoHa and LoKr, the LyCORIS pair: a structured low-rank update with the same options."""

    peft_fields = {
        "r": "r",
        "alpha": "alpha",
        "rank_dropout": "rank_dropout",
        "module_dropout": "module_dropout",
    }

    r: int = Field(8, ge=1, le=1024)
    alpha: float = Field(16, gt=0, le=4096)
    rank_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: TargetModules = "all-linear"
