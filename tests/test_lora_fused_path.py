"""Every speed and memory feature of the engine computes what the plain path computes.

- packed attention (per-example `sdpa`) = the masked `sdpa` of transformers = each example
  run alone, in values and gradients;
- the chunked output-layer cross-entropy = `F.cross_entropy` on the logits, within 1e-5,
  loss, correct count and gradients (hidden states and a trained output layer);
- LoRA dropout fused into `lora_A`: the same layer with dropout off, the expected drop
  rate and scale with it on, gradients equal to the same mask applied by hand, and
  checkpoints with the same keys that plain peft loads;
- splitting a step into forward passes of at most N tokens: the same step, and a resumed
  run with splitting is still exact.

No test here looks at a clock: bench/train_throughput.py measures the speed.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peft_engine import DataPaths, Hooks, fused_loss, train
from peft_engine.data.batching import pack, pad
from peft_engine.data.formats import DataFormat, Example
from peft_engine.data.tokenize import IGNORE, tokenize_dataset
from peft_engine.loss import batch_loss
from peft_engine.methods.lora import LoraMethod, build_lora
from peft_engine.methods.lora_fused import DropoutLinear, fuse_lora
from peft_engine.models.attention import (
    PACKED_ATTENTION,
    packed_forward_kwargs,
    use_packed_attention,
)
from peft_engine.training import split_by_tokens
from tests.conftest import chat, write_jsonl

ROWS = [
    chat("What is 2 plus 2?", "4."),
    chat("Hello! How are you today?", "I am fine, thank you, and you?"),
    chat("Capital of France?", "Paris is the capital of France."),
    chat("Name a colour.", "Blue, like the sky on a clear day in June."),
]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    rows = [Example(i + 1, DataFormat.CHAT, r) for i, r in enumerate(ROWS)]
    return tokenize_dataset(
        rows, tiny_tokenizer, max_seq_length=256, train_on_inputs=False
    ).examples


def _llama(tiny_model_dir, packed: bool):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    if packed:
        assert use_packed_attention(model)
    return model


# -- packed attention ------------------------------------------------------------------------


def _per_token_loss(model, batch, **extra):
    kwargs = {}
    if batch.cu_seqlens is not None and extra.get("bounds", True):
        kwargs = packed_forward_kwargs(batch.cu_seqlens, batch.longest)
    logits = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
        **kwargs,
    ).logits
    return F.cross_entropy(
        logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(batch.targets.shape)


def test_packed_attention_equals_masked_sdpa_and_each_example_alone(tiny_model_dir, examples):
    plain, packed = _llama(tiny_model_dir, False), _llama(tiny_model_dir, True)
    assert packed.config._attn_implementation == PACKED_ATTENTION
    batch = pack(examples)

    ours = _per_token_loss(packed, batch)
    masked = _per_token_loss(plain, batch)  # transformers' block-diagonal mask
    torch.testing.assert_close(ours, masked, atol=1e-5, rtol=1e-5)
    start = 0
    for example in examples:  # each example alone, no packing at all
        n = len(example.input_ids)
        alone = _per_token_loss(plain, pad([example], 0))[0]
        torch.testing.assert_close(ours[0, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n

    # gradients with respect to every weight agree too
    for model in (plain, packed):
        model.zero_grad()
        _per_token_loss(model, batch).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), packed.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batches_and_calls_without_bounds_use_the_masked_path(tiny_model_dir, examples):
    plain, packed = _llama(tiny_model_dir, False), _llama(tiny_model_dir, True)
    padded = pad(examples, 0)
    mask = padded.targets != IGNORE
    torch.testing.assert_close(
        _per_token_loss(packed, padded)[mask], _per_token_loss(plain, padded)[mask]
    )
    batch = pack(examples)  # packed row, but no bounds passed: sdpa's own packed mask
    torch.testing.assert_close(
        _per_token_loss(packed, batch, bounds=False), _per_token_loss(plain, batch)
    )


def test_eager_models_are_left_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"


# -- fused cross-entropy ---------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [256, 5])  # one chunk, and many with a ragged last one
def test_fused_loss_equals_plain_loss(tiny_model_dir, examples, chunk_rows, monkeypatch):
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    model = build_lora(_llama(tiny_model_dir, True), LoraMethod(dropout=0.0), "causal_lm")
    _randomise_lora_b(model)
    assert fused_loss.fused_parts(model) is not None
    batch = pack(examples)

    results = {}
    for fused in (True, False):
        model.zero_grad()
        result = batch_loss(model, batch, fused=fused)
        result.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[fused] = (result, grads)
    (ours, our_grads), (plain, plain_grads) = results[True], results[False]
    ours_loss, plain_loss = float(ours.loss.detach()), float(plain.loss.detach())
    assert abs(ours_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    assert ours.n_correct == plain.n_correct and ours.n_loss_tokens == plain.n_loss_tokens
    assert our_grads.keys() == plain_grads.keys() and our_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_loss_trains_the_output_layer_as_the_plain_one(tiny_model_dir, examples):
    """Full fine-tuning: the output layer's weight gets the same gradient."""
    model = _llama(tiny_model_dir, True)
    batch = pack(examples)
    grads = {}
    for fused in (True, False):
        model.zero_grad()
        batch_loss(model, batch, fused=fused).loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads[True]["lm_head.weight"].abs().sum() > 0
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_loss_in_evaluation_and_on_gpt2(tiny_model_dir, tmp_path, tiny_tokenizer, examples):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256)
    ).eval()
    llama = _llama(tiny_model_dir, True).eval()
    for model in (gpt2, llama):
        assert fused_loss.fused_parts(model) is not None
        batch = pad(examples, 0)  # padded rows: the attention mask path
        with torch.no_grad():
            ours, plain = batch_loss(model, batch), batch_loss(model, batch, fused=False)
        assert float(ours.loss) == pytest.approx(float(plain.loss), rel=1e-5)
        assert ours.n_correct == plain.n_correct


def test_fused_loss_refuses_heads_it_cannot_reproduce(tiny_model_dir):
    model = _llama(tiny_model_dir, False)
    model.config.final_logit_softcapping = 30.0
    assert fused_loss.fused_parts(model) is None
    lora_on_head = build_lora(
        _llama(tiny_model_dir, False),
        LoraMethod(dropout=0.0, target_modules=["q_proj", "lm_head"]),
        "causal_lm",
    )
    assert fused_loss.fused_parts(lora_on_head) is None  # the head is a LoRA layer


def _randomise_lora_b(model):
    """LoRA B starts at zero, which would leave LoRA A's gradient zero: make it count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


# -- fused LoRA layers and dropout ------------------------------------------------------------


def test_fused_dropout_replaces_peft_dropout_and_keeps_the_checkpoint_format(tiny_model_dir):
    torch.manual_seed(0)
    model = build_lora(_llama(tiny_model_dir, True), LoraMethod(dropout=0.1), "causal_lm")
    fused = [m for m in model.modules() if isinstance(m, DropoutLinear)]
    assert len(fused) == 2 * 7  # every linear layer of both blocks
    assert all(m.p == 0.1 for m in fused)
    assert fuse_lora(model) == 0  # nothing left to fuse
    keys = set(model.state_dict())
    plain = build_lora(_llama(tiny_model_dir, False), LoraMethod(dropout=0.1), "causal_lm")
    assert keys == set(plain.state_dict())
    # DoRA keeps peft's own modules and forward; dropout 0 keeps lora_A a plain Linear
    dora = build_lora(_llama(tiny_model_dir, False), LoraMethod(use_dora=True), "causal_lm")
    assert not any(isinstance(m, DropoutLinear) for m in dora.modules())
    assert not any(hasattr(m, "_peft_forward") for m in dora.modules())
    none = build_lora(_llama(tiny_model_dir, False), LoraMethod(dropout=0.0), "causal_lm")
    assert not any(isinstance(m, DropoutLinear) for m in none.modules())
    assert sum(hasattr(m, "_peft_forward") for m in none.modules()) == 2 * 7


def _lora_layer(p: float, *, bias: bool = True, dtype=torch.double):
    """One peft LoRA layer on a Linear (random B, so every gradient counts), fused."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias)).to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"])
    model = get_peft_model(net, config)
    _randomise_lora_b(model)
    layer = model.base_model.model[0]
    assert fuse_lora(model) == 1
    return model, layer


def _grads(model, x):
    return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("bias", [True, False])
def test_fused_lora_layer_equals_peft_without_dropout(bias):
    model, layer = _lora_layer(0.0, bias=bias)
    x = torch.randn(3, 7, 24, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(3, 7, 40, dtype=torch.double)
    for training in (True, False):
        model.train(training)
        out = layer(x)
        out.backward(grad_out)
        ours = [g.clone() for g in _grads(model, x)]
        model.zero_grad()
        x.grad = None
        expected = layer._peft_forward(x)  # peft's own forward, unchanged
        expected.backward(grad_out)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours, _grads(model, x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        model.zero_grad()
        x.grad = None


def test_fused_lora_layer_with_dropout_equals_the_same_mask_by_hand():
    from peft_engine.methods.lora_fused import _keep_mask

    model, layer = _lora_layer(0.3)
    model.train()
    x = torch.randn(2, 5, 24, dtype=torch.double, requires_grad=True)
    grad_out = torch.randn(2, 5, 40, dtype=torch.double)
    torch.manual_seed(5)
    out = layer(x)
    out.backward(grad_out)
    ours = [g.clone() for g in _grads(model, x)]
    model.zero_grad()
    x.grad = None

    torch.manual_seed(5)  # the same draw, by hand: base + B(A(x * mask) / (1 - p')) * scaling
    threshold = round(0.3 * 65536)
    keep = _keep_mask(x.detach().reshape(-1, 24), threshold).view(x.shape)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dropped = x * keep * (65536 / (65536 - threshold))
    expected = layer.base_layer(x) + F.linear(F.linear(dropped, a), b) * layer.scaling["default"]
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(ours, _grads(model, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_fused_lora_layer_leaves_the_other_cases_to_peft():
    """Adapters disabled or merged, several active adapters: peft's forward answers, and
    the output is what plain peft gives."""
    from peft import LoraConfig

    model, layer = _lora_layer(0.0)
    model.eval()
    x = torch.randn(4, 24, dtype=torch.double)
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(layer(x), layer.base_layer(x))
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged)
        layer.unmerge()
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
        layer.set_adapter(["default", "second"])
        torch.testing.assert_close(layer(x), layer._peft_forward(x))


def test_fused_dropout_off_in_eval_and_rate_and_scale_in_training():
    linear = torch.nn.Linear(64, 8, bias=False)
    layer = DropoutLinear.replacing(linear, 0.25)
    assert layer.weight is linear.weight
    x = torch.randn(4000, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x))

    layer.train()
    eye = DropoutLinear.replacing(torch.nn.Linear(64, 64, bias=False), 0.25)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(64))
    ones = torch.ones(4000, 64)
    out = eye(ones)  # each element: 0 (dropped) or 1 / (1 - p')
    dropped = float((out == 0).float().mean())
    assert dropped == pytest.approx(0.25, abs=0.01)
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - 16384 / 65536)))
    assert float(out.detach().mean()) == pytest.approx(1.0, abs=0.02)  # the expectation is kept


def test_fused_dropout_masks_are_independent_across_the_four_lanes_of_a_word():
    """Four elements' bits come from one random int64: each must still be dropped with
    probability p, and independently of its neighbours."""
    from peft_engine.methods.lora_fused import _keep_mask

    torch.manual_seed(3)
    x = torch.empty(50_000, 4)  # column j: lane j of every word
    keep = _keep_mask(x, round(0.5 * 65536)).double()
    for lane in range(4):
        assert float(keep[:, lane].mean()) == pytest.approx(0.5, abs=0.01)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        assert float((keep[:, a] * keep[:, b]).mean()) == pytest.approx(0.25, abs=0.01)
    rare = _keep_mask(x, round(0.05 * 65536))
    assert rare.dtype == torch.uint8 and set(rare.unique().tolist()) == {0, 1}
    assert float((rare == 0).double().mean()) == pytest.approx(0.05, abs=0.003)


def test_fused_dropout_gradients_equal_the_same_mask_applied_by_hand():
    torch.manual_seed(1)
    linear = torch.nn.Linear(17, 4, bias=False).double()
    layer = DropoutLinear.replacing(linear, 0.3)
    x = torch.randn(2, 5, 17, dtype=torch.double, requires_grad=True)  # not a multiple of 4

    torch.manual_seed(7)
    out = layer(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ours_x, ours_w = x.grad.clone(), layer.weight.grad.clone()

    # recover the mask the layer drew (same seed, same draw) and do it by hand
    torch.manual_seed(7)
    threshold = round(0.3 * 65536)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    bits = words.view(torch.int16)[: x.numel()].view(x.shape)
    keep = (bits >= threshold - 32768).double() * (65536 / (65536 - threshold))
    x.grad, layer.weight.grad = None, None
    F.linear(x * keep, layer.weight).backward(grad_out)
    torch.testing.assert_close(ours_x, x.grad)
    torch.testing.assert_close(ours_w, layer.weight.grad)
    torch.testing.assert_close(out, F.linear(x * keep, layer.weight).detach())


def test_fused_dropout_adapter_loads_in_plain_peft(tiny_model_dir, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = build_lora(_llama(tiny_model_dir, True), LoraMethod(dropout=0.1), "causal_lm")
    _randomise_lora_b(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


# -- forward passes of at most N tokens ------------------------------------------------------


def test_split_by_tokens_keeps_order_and_whole_examples(examples):
    lengths = [len(e.input_ids) for e in examples]
    for budget in (1, min(lengths), sum(lengths[:2]), sum(lengths)):
        pieces = split_by_tokens(list(examples), budget)
        assert [e for piece in pieces for e in piece] == list(examples)
        for piece in pieces:
            assert len(piece) == 1 or sum(len(e.input_ids) for e in piece) <= budget
    assert len(split_by_tokens(list(examples), sum(lengths))) == 1


QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(32)]


def _spec(**hyperparameters):
    return {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "method": {"type": "lora", "dropout": 0.0},  # masks are drawn per forward pass
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "eval_every_steps": 3,
            **hyperparameters,
        },
    }


def _losses(workdir):
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_a_step_split_into_small_forward_passes_is_the_same_step(
    tmp_path, tiny_registry, cache_dir
):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    runs = {}
    for budget in (10_000, 40):  # one forward pass a step / several (each ~30 tokens)
        runs[budget] = train(
            _spec(max_steps=3),
            tmp_path / str(budget),
            data=data,
            registry=tiny_registry,
            cache_dir=cache_dir,
            tokens_per_forward=budget,
        )
    whole, split = _losses(tmp_path / "10000"), _losses(tmp_path / "40")
    for step in whole:
        assert split[step] == pytest.approx(whole[step], abs=1e-6)
    from safetensors.torch import load_file

    a = load_file(runs[10_000].output_dir / "adapter_model.safetensors")
    b = load_file(runs[40].output_dir / "adapter_model.safetensors")
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, atol=1e-6, rtol=1e-5)


def test_resume_is_exact_with_small_forward_passes_and_dropout(tmp_path, tiny_registry, cache_dir):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    spec = {**_spec(checkpoint_every_steps=2), "method": {"type": "lora", "dropout": 0.1}}
    kw = {"data": data, "registry": tiny_registry, "cache_dir": cache_dir, "tokens_per_forward": 40}
    train(spec, tmp_path / "whole", **kw)
    seen = []
    stop = Hooks(
        on_metrics=lambda step, m: seen.append(step) if "train_loss" in m else None,
        should_stop=lambda: len(seen) >= 3,
    )
    assert train(spec, tmp_path / "split", stop, **kw).status == "stopped"
    train(
        spec,
        tmp_path / "split",
        resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-2",
        **kw,
    )
    expected, got = _losses(tmp_path / "whole"), _losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) and len(expected) == 6
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
