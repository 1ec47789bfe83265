"""LoRA as one fused layer, with dropout fused into `lora_A`: the same layer as peft's with
dropout off, the expected drop rate and scale with it on, gradients equal to the same mask
applied by hand, and checkpoints with the same keys that plain peft loads.

No test here looks at a clock: bench/train_throughput.py measures the speed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from peft_engine.methods.lora import LoraMethod, build_lora
from peft_engine.methods.lora_fused import DropoutLinear, fuse_lora
from tests.engine_helpers import randomise_lora_b, sdpa_llama


def test_fused_dropout_replaces_peft_dropout_and_keeps_the_checkpoint_format(tiny_model_dir):
    torch.manual_seed(0)
    model = build_lora(sdpa_llama(tiny_model_dir, True), LoraMethod(dropout=0.1), "causal_lm")
    fused = [m for m in model.modules() if isinstance(m, DropoutLinear)]
    assert len(fused) == 2 * 7  # every linear layer of both blocks
    assert all(m.p == 0.1 for m in fused)
    assert fuse_lora(model) == 0  # nothing left to fuse
    keys = set(model.state_dict())
    plain = build_lora(sdpa_llama(tiny_model_dir, False), LoraMethod(dropout=0.1), "causal_lm")
    assert keys == set(plain.state_dict())
    # DoRA keeps peft's own modules and forward; dropout 0 keeps lora_A a plain Linear
    dora = build_lora(sdpa_llama(tiny_model_dir, False), LoraMethod(use_dora=True), "causal_lm")
    assert not any(isinstance(m, DropoutLinear) for m in dora.modules())
    assert not any(hasattr(m, "_peft_forward") for m in dora.modules())
    none = build_lora(sdpa_llama(tiny_model_dir, False), LoraMethod(dropout=0.0), "causal_lm")
    assert not any(isinstance(m, DropoutLinear) for m in none.modules())
    assert sum(hasattr(m, "_peft_forward") for m in none.modules()) == 2 * 7


def _lora_layer(p: float, *, bias: bool = True, dtype=torch.double):
    """One peft LoRA layer on a Linear (random B, so every gradient counts), fused."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(11)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40, bias=bias)).to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["0"])
    model = get_peft_model(net, config)
    randomise_lora_b(model)
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
    model = build_lora(sdpa_llama(tiny_model_dir, True), LoraMethod(dropout=0.1), "causal_lm")
    randomise_lora_b(model)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
