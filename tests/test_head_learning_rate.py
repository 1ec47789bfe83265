"""The new task head's own learning rate: resolved from the spec, applied by the optimizer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel

from peft_engine.errors import SpecError
from peft_engine.methods import method_for
from peft_engine.methods.common import MethodTrainer
from peft_engine.models.heads import SequenceClassifier
from peft_engine.optim import build_optimizer as _optimizer
from peft_engine.spec import DatasetStats, ModelLimits, parse_spec, resolve_spec

STATS = DatasetStats(n_train=2000, n_validation=0, max_tokens=40, mean_tokens=20.0)
LIMITS = ModelLimits(max_position_embeddings=512)


def _resolved(task: str, method: dict, **hyperparameters):
    spec = parse_spec(
        {"model": "m", "task": task, "method": method, "hyperparameters": hyperparameters}
    )
    return resolve_spec(spec, STATS, LIMITS).hyperparameters


def test_auto_gives_a_fresh_head_a_higher_rate_than_an_adapter_or_a_full_fine_tune():
    lora = _resolved("seq_classification", {"type": "lora"})
    full = _resolved("token_classification", {"type": "full"})
    assert lora.head_learning_rate == 2e-3 > lora.learning_rate
    assert full.head_learning_rate == 2e-3 > full.learning_rate
    # a body rate above the head's floor: the head is never slower than the body
    fast = _resolved("seq_classification", {"type": "lora"}, learning_rate=0.05)
    assert fast.head_learning_rate == 0.05


def test_an_explicit_head_rate_is_kept_and_tasks_without_a_new_head_have_none():
    assert (
        _resolved("seq_classification", {"type": "lora"}, head_learning_rate=3e-4)
    ).head_learning_rate == 3e-4
    assert _resolved("causal_lm", {"type": "lora"}).head_learning_rate is None
    assert _resolved("seq_classification", {"type": "head_only"}).head_learning_rate is None


@pytest.mark.parametrize(
    ("task", "method", "message"),
    [
        ("causal_lm", "lora", "applies to seq_classification"),
        ("seq_classification", "head_only", "set that instead"),
    ],
)
def test_a_head_rate_where_there_is_no_separate_head_is_refused(task, method, message):
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(
            {
                "model": "m",
                "task": task,
                "method": {"type": method},
                "hyperparameters": {"head_learning_rate": 1e-3},
            }
        )
    assert caught.value.param == "hyperparameters.head_learning_rate"


def _classifier() -> SequenceClassifier:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return SequenceClassifier(BertModel(config, add_pooling_layer=False), 3, "mean")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_optimizer_puts_the_head_in_its_own_groups_at_the_head_rate(method):
    spec = parse_spec({"model": "m", "task": "seq_classification", "method": {"type": method}})
    model = method_for(method).build(_classifier(), spec.method, "seq_classification")
    hp = SimpleNamespace(learning_rate=1e-4, head_learning_rate=2e-3, weight_decay=0.01)
    optimizer = _optimizer(model, MethodTrainer(), hp)

    head = {
        id(p) for name, p in model.named_parameters() if p.requires_grad and "classifier" in name
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert head  # the head's weight and bias (peft's trained copy for lora)
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head or not ids & head  # no group mixes head and body
        assert group["lr"] == pytest.approx(2e-3 if ids <= head else 1e-4)
    # biases keep no weight decay, in the head as in the body
    decays = {(id(p), g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (id(p), 0.0 if p.ndim < 2 else 0.01) in decays, name


def test_a_methods_own_scaled_groups_keep_their_scale_for_the_body():
    model = _classifier()
    body = [p for n, p in model.named_parameters() if not n.startswith("classifier")]
    head = list(model.classifier.parameters())

    class Discriminative(MethodTrainer):
        def param_groups(self, weight_decay):
            return [
                {"params": body, "weight_decay": 0.0, "lr_scale": 0.5},
                {"params": head, "weight_decay": 0.0, "lr_scale": 1.0},
            ]

    hp = SimpleNamespace(learning_rate=1e-3, head_learning_rate=5e-3, weight_decay=0.0)
    optimizer = _optimizer(model, Discriminative(), hp)
    rates = sorted(group["lr"] for group in optimizer.param_groups)
    assert rates == pytest.approx([5e-4, 5e-3])


def test_auto_rates_on_a_classification_task_are_the_methods_head_task_rates():
    lora_lm = parse_spec({"model": "m", "method": {"type": "lora"}})
    assert resolve_spec(lora_lm, STATS, LIMITS).hyperparameters.learning_rate == 2e-4
    assert _resolved("seq_classification", {"type": "lora"}).learning_rate == 1e-3
    assert _resolved("token_classification", {"type": "lora", "r": 128}).learning_rate == 5e-4
    assert _resolved("seq_classification", {"type": "full"}).learning_rate == 5e-5
    assert _resolved("seq_classification", {"type": "adalora"}).learning_rate == 1e-3
    assert _resolved("token_classification", {"type": "loha"}).learning_rate == 1e-3
    assert _resolved("seq_classification", {"type": "ia3"}).learning_rate == 1e-2
    # methods without a head-task rate keep their one rate
    assert _resolved("seq_classification", {"type": "vera"}).learning_rate == 4e-3
