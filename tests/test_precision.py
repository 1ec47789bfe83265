"""Mixed precision on the CPU: bf16 autocast, and fp16 autocast with a GradScaler (this
torch's CPU autocast takes both), against fp32 on the tiny Llama.

What is held: the loss curve within a stated tolerance of fp32's; trained parameters and
AdamW's moments in float32 while the frozen weights are in the compute dtype; a float32
adapter that plain peft loads; resume exact within the mode; a mode the device cannot run
refused naming `hyperparameters.precision`. The CUDA paths (bf16 and fp16 autocast on a GPU,
the GradScaler there) run the same code but have not run on a GPU here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from peft_engine import DataPaths, Hooks
from peft_engine.checkpoint import STATE_FILE as STATE
from peft_engine.errors import SpecError
from peft_engine.methods.lora_fused import FALLBACKS
from peft_engine.precision import autocast_supported, resolve_precision, resumed_precision
from peft_engine.spec import parse_spec
from tests.conftest import logits_from_plain_peft, write_jsonl
from tests.engine_helpers import stop_after
from tests.test_training import QUESTIONS, _run, _spec, _train_losses

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Tolerances on this tiny Llama (random weights, 400-token vocabulary, loss about 6 over 18
# steps): each step's train loss and the final eval loss within LOSS_TOLERANCE (relative) of
# fp32's; the trained model's logits (|logit| <= 0.5) within LOGIT_TOLERANCE (absolute) of
# plain peft's on the float32 base. Measured: bf16 3.5e-5 relative on the losses and 0.0035
# on the logits, fp16 1e-5 and 0.0006; the tolerances leave a margin of 5 to 30 times.
LOSS_TOLERANCE = {"bf16": 1e-3, "fp16": 2e-4}
LOGIT_TOLERANCE = {"bf16": 0.02, "fp16": 0.004}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("precision-data")
    return DataPaths(write_jsonl(folder / "train.jsonl", QUESTIONS))


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, data, tiny_registry, cache_dir):
    workdir = tmp_path_factory.mktemp("fp32")
    spec = _spec(precision="fp32", checkpoint_every_steps=3)
    return _run(spec, workdir, data, tiny_registry, cache_dir), workdir


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_trains_like_fp32_with_float32_master_weights(
    mode, fp32, tmp_path, data, tiny_registry, tiny_model_dir, cache_dir
):
    events = []
    hooks = Hooks(on_event=events.append)
    spec = _spec(precision=mode, checkpoint_every_steps=3)
    fallbacks = dict(FALLBACKS)
    result = _run(spec, tmp_path / "run", data, tiny_registry, cache_dir, hooks)
    assert any(f"precision {mode} on cpu" in e.message for e in events)
    assert dict(FALLBACKS) == fallbacks  # the fused LoRA path ran under autocast

    # the loss curve and the evaluations (run under the same autocast) follow fp32's
    reference, got = _train_losses(fp32[1]), _train_losses(tmp_path / "run")
    assert sorted(got) == sorted(reference) == list(range(1, 19))
    worst = max(abs(got[s] - reference[s]) / reference[s] for s in got)
    assert 0 < worst <= LOSS_TOLERANCE[mode], worst  # not 0: it did compute in the mode
    assert got[18] < got[1]  # it trains
    final, final32 = (r.result["metrics"]["final"]["eval_loss"] for r in (result, fp32[0]))
    assert abs(final - final32) / final32 <= LOSS_TOLERANCE[mode]

    # trained parameters float32, frozen ones in the compute dtype
    params = dict(result.model.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert {params[n].dtype for n in trained} == {torch.float32}
    assert {p.dtype for n, p in params.items() if n not in trained} == {DTYPES[mode]}
    # AdamW's moments, as the checkpoint holds them, and the adapter: float32
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    moments = load_file(checkpoint / "optimizer.safetensors")
    assert moments and {t.dtype for t in moments.values()} == {torch.float32}
    adapter = load_file(result.output_dir / "adapter_model.safetensors")
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    scaler = json.loads((checkpoint / STATE).read_text())["grad_scaler"]
    assert (scaler["scale"] > 0) if mode == "fp16" else scaler == {}

    # plain peft loads the adapter on the float32 base; its logits are the trained model's
    # up to the compute dtype's rounding
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    model = result.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=DTYPES[mode]):
        expected = model(input_ids=input_ids).logits.float()
    got_logits = logits_from_plain_peft(tiny_model_dir, result.output_dir, input_ids, tmp_path)
    assert (got_logits - expected).abs().max() <= LOGIT_TOLERANCE[mode]


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_resume_is_exact_within_the_mode(mode, tmp_path, data, tiny_registry, cache_dir):
    spec = _spec(precision=mode, checkpoint_every_steps=3)
    whole = _run(spec, tmp_path / "whole", data, tiny_registry, cache_dir)
    stopped = _run(spec, tmp_path / "split", data, tiny_registry, cache_dir, stop_after(7))
    assert stopped.status == "stopped"
    resumed = _run(
        spec,
        tmp_path / "split",
        data,
        tiny_registry,
        cache_dir,
        resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-6",
    )

    expected, got = _train_losses(tmp_path / "whole"), _train_losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) == list(range(1, 19))
    for step in range(1, 19):
        assert abs(got[step] - expected[step]) <= 1e-6, step
    final = (r.result["metrics"]["final"]["eval_loss"] for r in (whole, resumed))
    assert next(final) == pytest.approx(next(final), abs=1e-6)
    weights = [load_file(r.output_dir / "adapter_model.safetensors") for r in (whole, resumed)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=1e-6, rtol=0)


def test_full_fine_tuning_in_bf16_trains_every_weight_in_float32(
    tmp_path, data, tiny_registry, cache_dir
):
    spec = {**_spec(precision="bf16", max_steps=3), "method": {"type": "full"}}
    result = _run(spec, tmp_path / "run", data, tiny_registry, cache_dir)
    assert {p.dtype for p in result.model.parameters()} == {torch.float32}
    saved = load_file(result.output_dir / "trained_weights.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    losses = _train_losses(tmp_path / "run")
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses.values())


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_reported_as_json(
    tmp_path, data, tiny_registry, cache_dir
):
    # Bottleneck adapters' first gradients overflow float16 at GradScaler's initial scale
    # (65536): the step is skipped, the scale halves, and training goes on.
    spec = {
        **_spec(precision="fp16", max_steps=3, checkpoint_every_steps=2),
        "method": {"type": "bottleneck_adapter"},
    }
    result = _run(spec, tmp_path / "run", data, tiny_registry, cache_dir)
    assert result.status == "succeeded"

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=refuse) for line in lines]
    train_rows = [r for r in rows if "train_loss" in r]
    assert "grad_norm" not in train_rows[0]  # skipped: its norm was infinite
    assert all(math.isfinite(r["grad_norm"]) for r in train_rows[1:])
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / STATE).read_text())
    assert state["grad_scaler"]["scale"] == 32768.0


def test_a_mode_the_device_cannot_run_is_refused_naming_the_field():
    cpu = torch.device("cpu")
    # this torch's CPU autocast computes in both, so the CPU runs both (tested above)
    assert autocast_supported(cpu, torch.bfloat16) and autocast_supported(cpu, torch.float16)
    assert resolve_precision("auto", cpu).mode == "fp32"
    assert resolve_precision("fp16", cpu).scaler is not None
    # a device without autocast (the meta device) cannot run either
    for mode in ("bf16", "fp16"):
        with pytest.raises(SpecError, match=f"{mode} needs a device") as err:
            resolve_precision(mode, torch.device("meta"))
        assert err.value.param == "hyperparameters.precision"
    assert resolve_precision("fp32", torch.device("meta")).mode == "fp32"


@pytest.mark.parametrize(
    ("field", "value"), [("precision", "fp8"), ("gradient_checkpointing", "yes")]
)
def test_the_spec_refuses_unknown_values_naming_the_field(field, value):
    with pytest.raises(SpecError) as err:
        parse_spec({"model": "tiny-llama", "hyperparameters": {field: value}})
    assert err.value.param == f"hyperparameters.{field}"


def test_auto_resumes_in_the_mode_its_checkpoint_trained_in(
    tmp_path, data, tiny_registry, cache_dir
):
    """A job at "auto" begun in bf16 on a GPU and resumed on a CPU goes on in bf16 (the CPU
    runs it), not in the CPU's own "auto" (fp32): the checkpoint records its mode. Here the
    GPU's half is played by a CPU checkpoint whose recorded mode says bf16."""
    spec = _spec(checkpoint_every_steps=3)
    _run(spec, tmp_path / "split", data, tiny_registry, cache_dir, stop_after(7))
    checkpoint = tmp_path / "split" / "checkpoints" / "checkpoint-6"
    state = json.loads((checkpoint / STATE).read_text())
    assert state["precision"] == "fp32"  # what it trained in, recorded
    (checkpoint / STATE).write_text(json.dumps({**state, "precision": "bf16"}))
    events = []
    resumed = _run(spec, tmp_path / "split", data, tiny_registry, cache_dir,
                   Hooks(on_event=events.append), resume_from=checkpoint)  # fmt: skip
    assert resumed.status == "succeeded"
    said = [e.message for e in events if e.message.startswith("precision")]
    assert said == ["precision bf16 on cpu: autocast to bf16; trained parameters and optimizer "
                    "state in float32, frozen weights in bf16 (precision bf16, as the "
                    "checkpoint trained)"]  # fmt: skip


def test_a_recorded_mode_the_device_cannot_run_falls_back_to_its_auto_and_says_so():
    meta = torch.device("meta")  # no autocast at all: it runs neither bf16 nor fp16
    precision, note = resumed_precision("auto", meta, "bf16")
    assert precision.mode == "fp32" and "cannot run" in note
    assert resumed_precision("auto", meta, None)[1] is None  # an older checkpoint: no note
    assert resumed_precision("fp32", meta, "bf16") == (resolve_precision("fp32", meta), None)
