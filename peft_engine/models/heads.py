"""Task models: a pretrained body with a new classification head.

`SequenceClassifier` pools the body's hidden states into one vector per example; how it
pools follows how the body was trained (DESIGN §7):
- `mean`: the mean over real tokens, for sentence-embedding encoders such as
  all-MiniLM-L6-v2 (their BERT pooler was never trained: a frozen body with a head on it
  learns close to nothing);
- `pooler`: the body's pooler output (BERT's CLS + dense + tanh), for models trained with it;
- `cls`: the first token's hidden state;
- `last`: the last real token, for decoder models (only it has read the whole input).

`TokenClassifier` puts the head on every token. Both are plain `nn.Module`s whose body is
the Hugging Face model (`body`) and whose head is `classifier`, so peft's methods wrap them
like any transformers model and save the head with the adapter. Inputs virtual tokens were
put in front of (prompt tuning) are handled: the attention mask then covers them too, and
`TokenClassifier` drops their positions from its logits.

`ImageClassifier` is the same for images: a vision backbone (ViT, MobileNetV2) whose pooled
features feed the `classifier` head.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from transformers.modeling_outputs import (
    ImageClassifierOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from peft_engine.models.loading import from_model_dir

if TYPE_CHECKING:
    from peft_engine.models.resident import ResidentLoader

Pooling = Literal["mean", "cls", "pooler", "last"]
POOLINGS: tuple[str, ...] = ("mean", "cls", "pooler", "last")
_DECODER_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt2"}


class _HeadModel(nn.Module):
    """A pretrained `body` and a new `classifier` head on its `features`-long outputs."""

    def __init__(self, body: nn.Module, features: int, n_labels: int) -> None:
        super().__init__()
        self.body = body
        config = body.config
        self.dropout = nn.Dropout(_dropout(config))
        self.classifier = nn.Linear(features, n_labels)
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)
        self.classifier.to(device=body.device, dtype=body.dtype)

    # What peft and transformers look up on a model they wrap.
    @property
    def config(self) -> Any:
        return self.body.config

    @property
    def device(self) -> torch.device:
        return self.body.device

    @property
    def dtype(self) -> torch.dtype:
        return self.body.dtype


class _TaskModel(_HeadModel):
    """A text body with a head on its hidden states."""

    def __init__(self, body: nn.Module, n_labels: int) -> None:
        super().__init__(body, body.config.hidden_size, n_labels)

    def get_input_embeddings(self) -> nn.Module:
        return self.body.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Any = None,
        labels: torch.Tensor | None = None,  # accepted for peft; the engine computes the loss
        **kwargs: Any,
    ) -> Any:
        extra = {k: v for k, v in kwargs.items() if k in ("token_type_ids", "position_ids")}
        if extra.get("token_type_ids") is None:
            extra.pop("token_type_ids", None)
        if past_key_values is not None:
            extra["past_key_values"] = past_key_values
        out = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **extra,
        )
        return self._head(out, attention_mask)

    def _head(self, out: Any, attention_mask: torch.Tensor | None) -> Any:
        """The task's output from the body's output."""
        raise NotImplementedError


class SequenceClassifier(_TaskModel):
    def __init__(self, body: nn.Module, n_labels: int, pooling: Pooling) -> None:
        super().__init__(body, n_labels)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}")
        self.pooling = pooling

    def _head(self, out: Any, attention_mask: torch.Tensor | None) -> SequenceClassifierOutput:
        pooled = self._pool(out.last_hidden_state, attention_mask, out)
        return SequenceClassifierOutput(logits=self.classifier(self.dropout(pooled)))

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, out: Any) -> Any:
        rows, length = hidden.shape[:2]
        if attention_mask is None:
            mask = hidden.new_ones(rows, length)
        else:  # prefix tuning puts its virtual tokens in the mask only: keep the real part
            mask = attention_mask[:, -length:].to(hidden.dtype)
        if self.pooling == "mean":
            summed = (hidden * mask.unsqueeze(-1)).sum(dim=1)
            return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("this model has no pooler; use pooling 'cls' or 'mean'")
            return out.pooler_output
        # last: the last real token of each row (padding is on the right)
        last = (mask.sum(dim=1).long() - 1).clamp(min=0)
        return hidden[torch.arange(rows, device=hidden.device), last]


class TokenClassifier(_TaskModel):
    def _head(self, out: Any, attention_mask: torch.Tensor | None) -> TokenClassifierOutput:
        return TokenClassifierOutput(logits=self.classifier(self.dropout(out.last_hidden_state)))


def _dropout(config: Any) -> float:
    for key in ("classifier_dropout", "hidden_dropout_prob", "hidden_dropout", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return 0.1


def default_pooling(model_path: Path) -> Pooling:
    """How the model was trained to pool, from its files alone (no weights loaded).

    A sentence-transformers directory says it in `1_Pooling/config.json`; a decoder pools its
    last token; a model shipped with pooler weights uses them; anything else its first token.
    """
    pooling_config = model_path / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        config = json.loads(pooling_config.read_text(encoding="utf-8"))
        if config.get("pooling_mode_mean_tokens"):
            return "mean"
        if config.get("pooling_mode_lasttoken"):
            return "last"
        if config.get("pooling_mode_cls_token"):
            return "cls"
    config = json.loads((model_path / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    if (
        config.get("model_type") in _DECODER_TYPES
        or config.get("is_decoder")
        or any(a.endswith("ForCausalLM") for a in architectures)
    ):
        return "last"
    return "pooler" if _has_pooler_weights(model_path) else "cls"


def _has_pooler_weights(model_path: Path) -> bool:
    from safetensors import safe_open

    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as handle:
            if any(".pooler." in f".{key}" for key in handle.keys()):  # noqa: SIM118
                return True
    return False


def load_body(
    path: Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    with_pooler: bool = False,
    resident: ResidentLoader | None = None,
) -> nn.Module:
    """The base model without its pretraining head (AutoModel), from local files only, or
    built from the resident weights (`resident`); the head is never part of what is kept."""
    if resident is not None:
        return resident.load(load_body, path, dtype=dtype, device=device, with_pooler=with_pooler)
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    options: dict[str, Any] = {}
    if config.model_type in ("bert", "roberta", "xlm-roberta") and not with_pooler:
        options["add_pooling_layer"] = False
    from transformers.utils import logging as hf_logging

    # Without its pooler, loading reports the checkpoint's pooler weights as unused: expected.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return from_model_dir(AutoModel, path, dtype=dtype, device=device, **options)
    finally:
        hf_logging.set_verbosity(level)


class ImageClassifier(_HeadModel):
    """An image backbone (`body`, the AutoModel of a vision checkpoint) with a linear head.

    The image's feature vector follows what the body outputs: a transformer (ViT) gives a
    sequence of patch states, whose first (CLS) state is used, after the body's final layer
    norm; a convolutional network (MobileNetV2) gives a feature map, globally averaged (its
    `pooler_output` when it has one). The feature size is `config.hidden_size` (ViT),
    `config.hidden_sizes[-1]` (ResNet-like), or the channels of the body's last convolution
    (MobileNetV2: 1280 with `finegrained_output`, whatever the depth multiplier).

    Batch norm layers whose own parameters are frozen keep their running statistics frozen
    too (they stay in eval mode when the model trains): a frozen body (head only, LoRA and the
    other adapters) is then truly frozen, and the saved weights reproduce the trained model.
    """

    def __init__(self, body: nn.Module, n_labels: int) -> None:
        super().__init__(body, ImageClassifier.feature_size(body), n_labels)

    @staticmethod
    def feature_size(body: nn.Module) -> int:
        """The length of the pooled feature vector the head reads."""
        config = body.config
        hidden = getattr(config, "hidden_size", None)
        if isinstance(hidden, int):
            return hidden
        sizes = getattr(config, "hidden_sizes", None)
        if isinstance(sizes, list | tuple) and sizes:
            return int(sizes[-1])
        convolutions = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
        if not convolutions:
            raise ValueError(f"cannot tell the feature size of a {type(body).__name__}")
        return convolutions[-1].out_channels

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            for module in self.body.modules():
                frozen = not any(p.requires_grad for p in module.parameters(recurse=False))
                if getattr(module, "track_running_stats", False) and frozen:
                    module.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,  # accepted for peft; the engine computes the loss
        **kwargs: Any,
    ) -> ImageClassifierOutput:
        if pixel_values is None:
            raise ValueError("an image classifier needs pixel_values")
        self._expose_wrapped_convolutions()
        out = self.body(pixel_values=pixel_values.to(self.dtype), return_dict=True)
        pooled = self._pool(out)
        return ImageClassifierOutput(logits=self.classifier(self.dropout(pooled)))

    def _expose_wrapped_convolutions(self) -> None:
        """Give an adapter wrapping a convolution (peft's LoRA Conv2d) the conv's geometry.

        MobileNetV2 with TensorFlow padding (every Google checkpoint) reads `stride`,
        `kernel_size` and `dilation` off its convolution at each forward; peft's wrapper does
        not pass them through to the layer it wraps, so they are copied onto it.
        """
        for module in self.body.modules():
            base = getattr(module, "base_layer", None)
            if isinstance(base, nn.Conv2d) and not isinstance(module, nn.Conv2d):
                for name in _CONV_GEOMETRY:
                    if name not in module.__dict__:
                        setattr(module, name, getattr(base, name))

    @staticmethod
    def _pool(out: Any) -> torch.Tensor:
        hidden = out.last_hidden_state
        if hidden.ndim == 3:  # (batch, patches, hidden): the CLS token
            return hidden[:, 0]
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:  # (batch, channels[, 1, 1]): the body's own global pool
            return pooled.flatten(1)
        return hidden.mean(dim=(2, 3))  # (batch, channels, height, width): average pool


_CONV_GEOMETRY = ("stride", "padding", "dilation", "kernel_size", "groups")
