"""Gradient checkpointing on the tiny Llama: the same loss and gradients as without it, for
LoRA (fused, with dropout: the recomputation must redraw the same masks) and for full
fine-tuning; a run with it trains and resumes to the losses of a run without it.

Tolerance: losses and gradients allclose at rtol 1e-5, atol 1e-7 (the recomputation replays
the same float32 operations, so they come out equal; the tolerance only allows for a kernel
that sums in another order).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from peft_engine import DataPaths, train
from peft_engine.activation_checkpointing import enable_gradient_checkpointing
from peft_engine.data.batching import collate
from peft_engine.errors import SpecError
from peft_engine.loss import batch_loss
from peft_engine.methods import method_for
from peft_engine.methods.full import FullMethod
from peft_engine.methods.lora import LoraMethod
from tests.conftest import write_jsonl
from tests.engine_helpers import randomise_lora_b, sdpa_llama, stop_after, tokenized_chat_examples
from tests.test_training import QUESTIONS, _spec, _train_losses


def _model(tiny_model_dir, method: str, packed: bool, checkpointing: bool):
    torch.manual_seed(0)  # the same LoRA initialisation for both models
    spec = LoraMethod(dropout=0.1) if method == "lora" else FullMethod()
    model = method_for(spec.type).build(sdpa_llama(tiny_model_dir, packed), spec, "causal_lm")
    if method == "lora":
        randomise_lora_b(model)
    if checkpointing:
        enable_gradient_checkpointing(model, spec.type)
    return model.train()


def _loss_and_gradients(model, batch):
    """The batch's summed loss and every trained parameter's gradient; how often the decoder
    layers ran (a recomputation runs each again in the backward pass). transformers
    checkpoints a layer's `forward`, so hooks on the layer itself run once: the layer's first
    module, its input norm, is counted instead."""
    calls = []
    hooks = [
        m.input_layernorm.register_forward_pre_hook(lambda *_: calls.append(1))
        for m in model.modules()
        if isinstance(m, LlamaDecoderLayer)
    ]
    torch.manual_seed(1)  # the same dropout masks
    result = batch_loss(model, batch)
    result.loss.backward()
    for hook in hooks:
        hook.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return result.loss.detach(), grads, len(calls)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_same_loss_and_gradients_with_and_without_checkpointing(
    method, packed, tiny_model_dir, tiny_tokenizer
):
    examples = tokenized_chat_examples(tiny_tokenizer)
    batch = collate(examples, packing=packed, pad_token_id=tiny_tokenizer.pad_token_id)
    plain = _loss_and_gradients(_model(tiny_model_dir, method, packed, False), batch)
    checkpointed = _loss_and_gradients(_model(tiny_model_dir, method, packed, True), batch)

    assert plain[2] == 2 and checkpointed[2] == 4  # two layers, each recomputed once
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-5, atol=1e-7)
    assert set(checkpointed[1]) == set(plain[1])
    if method == "full":
        assert "model.embed_tokens.weight" in plain[1]
    for name, grad in plain[1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-5, atol=1e-7)


def _checkpointing_on(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def test_a_run_with_checkpointing_trains_and_resumes_as_one_without(
    tmp_path, tiny_registry, cache_dir
):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))

    def run(spec, workdir, hooks=None, **kw):
        return train(
            spec, workdir, hooks, data=data, registry=tiny_registry, cache_dir=cache_dir, **kw
        )

    plain = run(_spec(checkpoint_every_steps=3), tmp_path / "plain")  # "auto": off
    assert not _checkpointing_on(plain.model)

    spec = _spec(gradient_checkpointing=True, checkpoint_every_steps=3)
    assert run(spec, tmp_path / "split", stop_after(7)).status == "stopped"
    resume_from = tmp_path / "split" / "checkpoints" / "checkpoint-6"
    resumed = run(spec, tmp_path / "split", resume_from=resume_from)
    assert resumed.status == "succeeded" and _checkpointing_on(resumed.model)

    expected, got = _train_losses(tmp_path / "plain"), _train_losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) == list(range(1, 19))
    for step in range(1, 19):
        assert abs(got[step] - expected[step]) <= 1e-5, step
    assert got[18] < got[1]
    final = (r.result["metrics"]["final"]["eval_loss"] for r in (plain, resumed))
    assert next(final) == pytest.approx(next(final), abs=1e-5)


def test_prefix_tuning_with_checkpointing_is_refused_naming_the_field(
    tmp_path, tiny_registry, cache_dir
):
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    spec = {**_spec(gradient_checkpointing=True, max_steps=1), "method": {"type": "prefix_tuning"}}
    with pytest.raises(SpecError, match="prefix_tuning") as err:
        train(spec, tmp_path / "run", data=data, registry=tiny_registry, cache_dir=cache_dir)
    assert err.value.param == "hyperparameters.gradient_checkpointing"


def test_the_resume_fingerprint_ignores_checkpointing_and_a_default_precision():
    """Checkpointing changes no figure, so a job may turn it on and still resume; and a
    checkpoint made before `precision` existed (under "auto") keeps its fingerprint."""
    from types import SimpleNamespace

    from peft_engine.checkpoint import spec_fingerprint
    from peft_engine.spec import JobSpec

    def fingerprint(**hp) -> str:
        spec = JobSpec.model_validate(
            {"model": "m", "task": "causal_lm", "training_file": "f", "hyperparameters": hp}
        )
        examples = [SimpleNamespace(line=n) for n in (3, 1, 2)]
        return spec_fingerprint(
            SimpleNamespace(spec=spec, train=SimpleNamespace(examples=examples))
        )

    assert (
        fingerprint() == fingerprint(gradient_checkpointing=True) == fingerprint(precision="auto")
    )
    assert fingerprint(precision="bf16") != fingerprint()
    assert fingerprint(learning_rate=1e-3) != fingerprint()
    dumped = JobSpec.model_validate({"model": "m", "task": "causal_lm", "training_file": "f"})
    assert "precision" in dumped.hyperparameters.model_dump()  # the field exists; left out above


def test_auto_recomputes_only_a_job_that_would_not_fit_the_gpu(tmp_path, tiny_registry, cache_dir):
    """ "auto" turns checkpointing on where the estimated peak without it is over the
    device's memory (less headroom), and never on a CPU. The GPU's size is given here."""
    import torch

    from peft_engine.activation_checkpointing import (
        HEADROOM,
        over_device_memory,
        wants_checkpointing,
    )
    from peft_engine.memory import job_memory
    from peft_engine.prepare import prepare_job
    from peft_engine.spec import JobSpec

    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))
    job = prepare_job(
        JobSpec.model_validate(_spec()), data, registry=tiny_registry, cache_dir=cache_dir
    )
    longest = max(e.n_tokens for e in job.train.examples)
    peak = job_memory(job.model_path, job.spec, longest_sequence=longest)
    off = peak["peak_bytes_by_checkpointing"]["off"]
    assert off > peak["peak_bytes_by_checkpointing"]["on"] > 0

    assert over_device_memory(job, int(off / HEADROOM) - 1)
    assert not over_device_memory(job, int(off / HEADROOM) + 1)
    assert not wants_checkpointing(job, torch.device("cpu"))  # auto: never on a CPU
    forced = prepare_job(
        JobSpec.model_validate(_spec(gradient_checkpointing=True)),
        data,
        registry=tiny_registry,
        cache_dir=cache_dir,
    )
    assert wants_checkpointing(forced, torch.device("cpu"))
