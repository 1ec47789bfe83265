"""Bottleneck adapters (Houlsby) on tiny random BERT, Llama and ViT models built in memory.

Where `auto` puts the adapters, that the adapted model starts as the base model, that only
the adapters (and a task head) train, and that the saved tensors reload onto a fresh base.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peft_engine.methods.bottleneck  # noqa: F401  (registers the method)
from peft_engine.methods import METHODS
from peft_engine.methods.bottleneck import (
    AUTO_TARGETS,
    BottleneckAdapterMethod,
    build_bottleneck,
    find_targets,
)
from peft_engine.methods.bottleneck_layers import AdaptedLinear, BottleneckAdapter
from peft_engine.methods.weights import TRAINED_WEIGHTS, TRAINED_WEIGHTS_FILE

HIDDEN = 32
LAYERS = 2
BOTTLENECK = 8


# What every tiny model here shares: its size, and no dropout (outputs are compared).
TINY = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=100, **TINY, **NO_DROPOUT))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, num_key_value_heads=2, max_position_embeddings=64, **TINY)
    return LlamaForCausalLM(config)


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTModel

    return ViTModel(ViTConfig(image_size=16, patch_size=8, num_channels=3, **TINY, **NO_DROPOUT))


def _token_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([[1, 5, 9, 23, 42, 7], [3, 3, 8, 99, 0, 12]])}


def _image_inputs() -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, torch.Tensor]]
    output: str  # the output field compared
    targets: tuple[str, ...]  # the auto targets of layer 0, without the layer's prefix
    layer_prefix: str  # the name in front of a layer's index


CASES = {
    "bert": Case(
        _bert,
        _token_inputs,
        "last_hidden_state",
        ("attention.output.dense", "output.dense"),
        "encoder.layer.",
    ),
    "llama": Case(
        _llama, _token_inputs, "logits", ("self_attn.o_proj", "mlp.down_proj"), "model.layers."
    ),
    "vit": Case(
        _vit,
        _image_inputs,
        "last_hidden_state",
        ("attention.o_proj", "mlp.fc2"),  # transformers 5 names ViT's layers like Llama's
        "layers.",
    ),
}


def _base(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.make().eval()


def _adapted(case: Case, seed: int = 0, **options: object) -> nn.Module:
    spec = BottleneckAdapterMethod(bottleneck=BOTTLENECK, **options)
    model = build_bottleneck(_base(case, seed), spec, "causal_lm")
    return model.eval()


def _output(model: nn.Module, case: Case) -> torch.Tensor:
    return getattr(model(**case.inputs()), case.output)


def _expected_targets(case: Case) -> list[str]:
    return [f"{case.layer_prefix}{i}.{t}" for i in range(LAYERS) for t in case.targets]


def _train_steps(model: nn.Module, case: Case, steps: int) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        _output(model, case).sum().backward()
        optimizer.step()


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]


# --- where the adapters go -----------------------------------------------------------------


def test_auto_targets_are_the_attention_and_ffn_output_projections(case: Case) -> None:
    assert find_targets(_base(case), "auto") == _expected_targets(case)
    model = _adapted(case)
    adapted = [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]
    assert adapted == _expected_targets(case)
    for name in adapted:
        assert isinstance(model.get_submodule(name).base_layer, nn.Linear)
        assert not isinstance(model.get_submodule(name).base_layer, AdaptedLinear)


@pytest.mark.parametrize(
    ("case", "ffn_input", "query"),
    [
        ("bert", "encoder.layer.{}.intermediate.dense", "encoder.layer.{}.attention.self.query"),
        ("vit", "layers.{}.mlp.fc1", "layers.{}.attention.q_proj"),
    ],
)
def test_ffn_input_and_pooler_are_not_adapted(case: str, ffn_input: str, query: str) -> None:
    model = _adapted(CASES[case])
    for i in range(LAYERS):
        assert type(model.get_submodule(ffn_input.format(i))) is nn.Linear
        assert type(model.get_submodule(query.format(i))) is nn.Linear
    assert type(model.get_submodule("pooler.dense")) is nn.Linear


def test_llama_lm_head_is_not_adapted_even_when_named() -> None:
    spec = BottleneckAdapterMethod(bottleneck=4, target_modules=["lm_head", "o_proj"])
    model = build_bottleneck(_base(CASES["llama"]), spec, "causal_lm")
    assert type(model.lm_head) is nn.Linear
    assert [n for n, m in model.named_modules() if isinstance(m, AdaptedLinear)] == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(LAYERS)
    ]


def test_distilbert_auto_targets() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    names = find_targets(DistilBertModel(config), "auto")
    assert names == [
        f"transformer.layer.{i}.{t}" for i in range(2) for t in ("attention.out_lin", "ffn.lin2")
    ]


def test_explicit_targets_match_whole_name_components() -> None:
    model = _base(CASES["bert"])
    # "dense" matches every `.dense`; "ntermediate.dense" is not a whole component.
    assert find_targets(model, ["intermediate.dense"]) == [
        f"encoder.layer.{i}.intermediate.dense" for i in range(LAYERS)
    ]
    assert find_targets(model, ["ntermediate.dense"]) == []
    assert "pooler.dense" in find_targets(model, ["dense"])


def test_auto_target_list() -> None:
    assert "intermediate.dense" not in AUTO_TARGETS
    assert {"self_attn.o_proj", "mlp.down_proj", "attention.out_lin", "ffn.lin2"} <= set(
        AUTO_TARGETS
    )


# --- the adapted model at init -------------------------------------------------------------


def test_adapted_model_starts_exactly_as_the_base_model(case: Case) -> None:
    with torch.no_grad():
        expected = _output(_base(case), case)
        actual = _output(_adapted(case), case)
    assert torch.equal(actual, expected)


def test_adapter_init_is_zero_up_and_small_deterministic_down() -> None:
    torch.manual_seed(3)
    first = BottleneckAdapter(HIDDEN, BOTTLENECK)
    torch.manual_seed(3)
    second = BottleneckAdapter(HIDDEN, BOTTLENECK)
    assert torch.equal(first.down.weight, second.down.weight)
    assert not torch.all(first.down.weight == 0)
    assert first.down.weight.abs().max() < 0.1
    assert torch.all(first.up.weight == 0) and torch.all(first.up.bias == 0)
    x = torch.randn(4, HIDDEN)
    assert torch.equal(first(x), x)


def test_only_adapters_train_and_their_count_is_the_formula(case: Case) -> None:
    model = _adapted(case)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".adapter." in n for n in trainable)
    per_adapter = 2 * HIDDEN * BOTTLENECK + BOTTLENECK + HIDDEN
    assert sum(p.numel() for p in trainable.values()) == LAYERS * 2 * per_adapter
    first = _expected_targets(case)[0]
    assert f"{first}.adapter.down.weight" in trainable
    assert f"{first}.adapter.up.bias" in trainable
    assert not model.get_submodule(first).base_layer.weight.requires_grad


def test_adapters_follow_the_base_layers_dtype() -> None:
    base = _base(CASES["bert"]).to(torch.bfloat16)
    model = build_bottleneck(base, BottleneckAdapterMethod(bottleneck=4), "causal_lm")
    adapter = model.get_submodule("encoder.layer.0.output.dense.adapter")
    assert adapter.down.weight.dtype == torch.bfloat16
    assert adapter.up.weight.dtype == torch.bfloat16


# --- training -------------------------------------------------------------------------------


def test_training_changes_adapters_and_leaves_the_base_bit_identical(case: Case) -> None:
    original = {n: p.detach().clone() for n, p in _base(case).named_parameters()}
    model = _adapted(case)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The wrapped base weights are the original ones, under `base_layer`.
    base_before = {
        n.replace(".base_layer.", "."): p for n, p in before.items() if ".adapter." not in n
    }
    assert base_before.keys() == original.keys()
    assert all(torch.equal(base_before[n], p) for n, p in original.items())

    _train_steps(model, case, steps=1)
    after = dict(model.named_parameters())
    for name, value in before.items():
        if ".adapter.up." in name:
            assert not torch.equal(after[name], value), f"{name} did not change"
        elif ".adapter.down." in name:
            # `up` is zero, so no gradient reaches `down` on the first step (Houlsby's init).
            assert torch.equal(after[name], value), f"{name} changed on the first step"
        else:
            assert torch.equal(after[name], value), f"base parameter {name} changed"
            assert after[name].grad is None

    _train_steps(model, case, steps=1)
    after = dict(model.named_parameters())
    for name, value in before.items():
        if name.endswith(".adapter.down.weight"):
            assert not torch.equal(after[name], value), f"{name} did not change"
        elif ".adapter." not in name:
            assert torch.equal(after[name], value), f"base parameter {name} changed"


def test_saved_tensors_reload_onto_a_fresh_base(case: Case, tmp_path: Path) -> None:
    model = _adapted(case)
    _train_steps(model, case, steps=3)
    model.eval()
    with torch.no_grad():
        expected = _output(model, case)

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(tensors, tmp_path / "adapters.safetensors")
    loaded = load_file(tmp_path / "adapters.safetensors")
    assert set(loaded) == set(tensors)
    assert all(".adapter." in n for n in loaded)

    spec = BottleneckAdapterMethod(bottleneck=BOTTLENECK)
    fresh = _base(case)
    torch.manual_seed(1234)  # other adapter init: what is restored must come from the file
    fresh = build_bottleneck(fresh, spec, "causal_lm").eval()
    with torch.no_grad():
        assert not torch.equal(_output(fresh, case), expected)
    result = fresh.load_state_dict(loaded, strict=False)
    assert result.unexpected_keys == []
    assert not any(".adapter." in k for k in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(_output(fresh, case), expected)


def test_trained_weights_format_saves_and_restores_the_adapters(tmp_path: Path) -> None:
    case = CASES["bert"]
    model = _adapted(case)
    _train_steps(model, case, steps=2)
    model.eval()
    TRAINED_WEIGHTS.save(model, tmp_path)
    fresh = _adapted(case, seed=0)
    TRAINED_WEIGHTS.restore(fresh, load_file(tmp_path / TRAINED_WEIGHTS_FILE))
    with torch.no_grad():
        assert torch.equal(_output(fresh.eval(), case), _output(model, case))


# --- a classification head ------------------------------------------------------------------


class _Classifier(nn.Module):
    def __init__(self, body: nn.Module, n_labels: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(body.config.hidden_size, n_labels)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(input_ids=input_ids).last_hidden_state[:, 0])


def test_task_head_trains_and_is_never_adapted() -> None:
    torch.manual_seed(0)
    wrapper = _Classifier(_bert(), n_labels=3)
    # Even named explicitly, the head is left as it is.
    spec = BottleneckAdapterMethod(bottleneck=4, target_modules=["classifier", "output.dense"])
    model = build_bottleneck(wrapper, spec, "seq_classification")
    assert model is wrapper
    assert type(model.classifier) is nn.Linear
    assert all(p.requires_grad for p in model.classifier.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"} | {
        f"body.encoder.layer.{i}.{t}.adapter.{lin}.{w}"
        for i in range(LAYERS)
        for t in ("attention.output.dense", "output.dense")
        for lin in ("down", "up")
        for w in ("weight", "bias")
    }
    model(input_ids=_token_inputs()["input_ids"]).sum().backward()
    assert model.classifier.weight.grad is not None


def test_causal_lm_task_trains_no_head() -> None:
    model = _adapted(CASES["llama"])
    assert not any(p.requires_grad for p in model.lm_head.parameters())


# --- refusals -------------------------------------------------------------------------------


def test_targets_that_match_nothing_are_refused() -> None:
    spec = BottleneckAdapterMethod(target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match=r"no linear layers matching .*no_such_layer.* BertModel"):
        build_bottleneck(_base(CASES["bert"]), spec, "causal_lm")


def test_model_without_auto_targets_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(
        ValueError,
        match="no attention/FFN output projections found in Sequential; name them in "
        "target_modules",
    ):
        build_bottleneck(model, BottleneckAdapterMethod(), "causal_lm")


def test_a_second_application_is_refused() -> None:
    model = _adapted(CASES["bert"])
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        build_bottleneck(model, BottleneckAdapterMethod(bottleneck=4), "causal_lm")
    # Layers inside an adapted layer are never targets, even when a suffix names them.
    assert find_targets(model, ["up", "down", "base_layer"]) == []
    with pytest.raises(ValueError, match="already has bottleneck adapters"):
        build_bottleneck(model, BottleneckAdapterMethod(target_modules=["up"]), "causal_lm")


@pytest.mark.parametrize(
    "options",
    [
        {"bottleneck": 0},
        {"bottleneck": 4097},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"activation": "swish"},
        {"target_modules": []},
        {"target_modules": [""]},
        {"target_modules": "all-linear"},
        {"rank": 8},  # unknown field
    ],
)
def test_spec_validation(options: dict[str, object]) -> None:
    with pytest.raises(pydantic.ValidationError):
        BottleneckAdapterMethod(**options)


def test_spec_defaults() -> None:
    spec = BottleneckAdapterMethod.model_validate({"type": "bottleneck_adapter"})
    assert (spec.bottleneck, spec.activation, spec.dropout, spec.target_modules) == (
        64,
        "gelu",
        0.0,
        "auto",
    )


def test_registration() -> None:
    method = METHODS["bottleneck_adapter"]
    assert method.spec is BottleneckAdapterMethod
    assert method.build is build_bottleneck
    assert method.weights is TRAINED_WEIGHTS
    assert set(method.tasks) == {"causal_lm", "seq_classification", "token_classification"}
    assert method.default_learning_rate(BottleneckAdapterMethod()) == 1e-3
    assert {"bert", "llama", "vit", "distilbert", "qwen3"} <= set(method.families or ())


def test_importing_the_method_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, peft_engine.methods.bottleneck as b\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert b.BottleneckAdapterMethod(bottleneck=4).bottleneck == 4\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
