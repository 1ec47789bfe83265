"""QLoRA (`base_precision: "nf4"`, peft_engine/quantization.py): the spec's rules, the refusals
where 4-bit cannot run (at submit and at the job's start), the memory estimate, and on CPU,
where bitsandbytes' CPU backend quantises to 4 bits (0.46 and later), real runs on the tiny
Llama: the loss falls, the adapter is a peft adapter that loads onto a 4-bit base and onto a
float32 one, and merges there. CUDA runs are marked `gpu` and skipped without CUDA
(bench/gpu/check.sh runs them).

"Without bitsandbytes" is made by hiding the installed package from imports
(sys.modules[name] = None, as Python marks a module that is not there): a third-party
package's absence, not a stand-in for any part of tuneq.

Tolerances: an adapter reloaded onto a fresh 4-bit base gives the trained model's logits to
1e-5 (quantising the same weights is deterministic); merged into a float32 base it gives
the unmerged float32 base + adapter's logits to 1e-4 (one addition reordered). The float32
base differs from the 4-bit one by NF4's rounding: its logits differ from the 4-bit
model's by more than 1e-4 and less than 0.2 (measured: 0.05, where the tiny Llama's logits
are within +-0.5).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_engine import DataPaths, train
from peft_engine.errors import SpecError, UnsupportedHardwareError
from peft_engine.memory import NF4_BITS, estimate_memory, job_memory, read_model_shape
from peft_engine.methods.lora import LoraMethod
from peft_engine.quantization import PARAM, four_bit_missing, is_quantized
from peft_engine.spec import parse_spec
from tests.conftest import write_jsonl
from tests.engine_helpers import stop_after
from tests.test_training import QUESTIONS, _run, _spec, _train_losses

REPO = Path(__file__).resolve().parents[1]
CPU_4BIT = four_bit_missing("cpu")
needs_cpu_4bit = pytest.mark.skipif(
    CPU_4BIT is not None, reason=f"no 4-bit on this CPU: {CPU_4BIT}"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)


@pytest.fixture
def data(tmp_path):
    return DataPaths(write_jsonl(tmp_path / "train.jsonl", QUESTIONS))


def _nf4(**changes):
    return {"model": "tiny-llama", "hyperparameters": {"base_precision": "nf4"}, **changes}


# ----------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"task": "seq_classification"}, "causal_lm only"),
        ({"method": {"type": "ia3"}}, "LoRA adapters only, not method 'ia3'"),
        ({"method": {"type": "full"}}, "LoRA adapters only, not method 'full'"),
        ({"method": {"type": "lora", "init": "pissa"}}, "cannot use init 'pissa'"),
    ],
)
def test_nf4_is_refused_outside_lora_on_causal_lm_naming_the_field(changes, says):
    with pytest.raises(SpecError) as refused:
        parse_spec(_nf4(**changes))
    assert refused.value.param == PARAM and says in refused.value.message


def test_nf4_lora_on_causal_lm_is_a_valid_spec_and_auto_is_the_default():
    assert parse_spec(_nf4()).hyperparameters.base_precision == "nf4"
    dpo = _nf4(method={"type": "lora", "objective": {"type": "dpo"}})
    dpo["hyperparameters"]["packing"] = False
    assert parse_spec(dpo).method.objective.type == "dpo"
    assert parse_spec({"model": "m"}).hyperparameters.base_precision == "auto"
    with pytest.raises(SpecError) as refused:
        parse_spec(_nf4(hyperparameters={"base_precision": "int8"}))
    assert refused.value.param == PARAM


# ------------------------------------------------------------------- where it cannot run


def test_without_bitsandbytes_the_job_is_refused_at_its_start(
    without_bitsandbytes, tmp_path, data, tiny_registry, cache_dir
):
    assert "bitsandbytes is not installed" in four_bit_missing("cpu")
    with pytest.raises(UnsupportedHardwareError) as refused:
        train(_spec(base_precision="nf4"), tmp_path / "run", data=data, registry=tiny_registry,
              cache_dir=cache_dir)  # fmt: skip
    assert refused.value.param == PARAM and refused.value.code == "unsupported_hardware"
    assert "tuneq[qlora]" in refused.value.message and not (tmp_path / "run" / "output").exists()


def test_submit_refuses_nf4_without_gpu_queues_where_the_api_cannot_run_4bit(
    without_bitsandbytes, tmp_path, tiny_registry_file
):
    from tests.api_helpers import assert_problem
    from tests.test_memory_routing import Deployment

    deployment = Deployment(tmp_path, tiny_registry_file, None)
    for dry_run in (False, True):
        body = assert_problem(deployment.submit(dry_run, base_precision="nf4"), 422)
        assert body["code"] == "unsupported_hardware" and body["param"] == PARAM
        assert "TUNEQ_GPU_QUEUE_MEMORY_GIB" in body["detail"]
        assert body["errors"] == [{"message": body["detail"], "field": PARAM}]
    assert deployment.jobs() == 0
    assert deployment.submit(base_precision="auto").status_code == 201


def test_the_submit_check_imports_no_torch():
    code = (
        "import sys; from peft_engine.quantization import installed_four_bit_missing as f; "
        "f(); print(sorted({'torch', 'bitsandbytes'} & set(sys.modules)))"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert ran.returncode == 0 and ran.stdout.strip() == "[]", ran.stderr


def test_submit_takes_nf4_where_the_deployment_lists_gpu_queues(
    without_bitsandbytes, tmp_path, tiny_registry_file
):
    from tests.test_memory_routing import Deployment
    from tests.test_queue_routing import _messages

    deployment = Deployment(tmp_path, tiny_registry_file, {"l4": 24.0})
    created = deployment.submit(base_precision="nf4")
    assert created.status_code == 201, created.text
    memory = created.json()["estimate"]["memory"]
    assert memory["base_precision"] == "nf4"
    assert _messages(deployment.settings, "l4") == [[created.json()["id"]]]


def test_routing_counts_an_nf4_job_by_its_4bit_estimate(tmp_path, tiny_registry_file):
    from tests.api_helpers import assert_problem
    from tests.test_memory_routing import Deployment

    roomy = Deployment(tmp_path / "roomy", tiny_registry_file, {"gpu": 80.0})
    peaks = {
        precision: roomy.submit(True, base_precision=precision).json()["estimate"]["memory"]
        for precision in ("auto", "nf4")
    }
    assert peaks["nf4"]["weights_bytes"] < peaks["auto"]["weights_bytes"]
    tiny = {"gpu": peaks["nf4"]["peak_bytes_by_checkpointing"]["on"] / 2 / 2**30}
    body = assert_problem(
        Deployment(tmp_path / "tiny", tiny_registry_file, tiny).submit(base_precision="nf4"), 422
    )
    assert body["code"] == "insufficient_gpu_memory" and "the base in nf4" in body["detail"]


@needs_cpu_4bit
def test_submit_takes_nf4_where_the_api_itself_can_run_4bit(tmp_path, tiny_registry_file):
    from peft_engine.quantization import installed_four_bit_missing
    from tests.test_memory_routing import Deployment

    assert installed_four_bit_missing() is None  # judged without torch, as the API does
    created = Deployment(tmp_path, tiny_registry_file, None).submit(base_precision="nf4")
    assert created.status_code == 201, created.text


# ------------------------------------------------------------------------ the estimate


def test_the_estimate_counts_the_linear_weights_at_nf4s_bits(tiny_model_dir):
    shape = read_model_shape(tiny_model_dir)
    method = LoraMethod(r=4)
    kw = {"tokens": 64, "precision": "bf16", "checkpointing": False}
    auto = estimate_memory(shape, method, **kw)
    nf4 = estimate_memory(shape, method, base_precision="nf4", **kw)

    linear = [i * o for i, o in shape.linear_layers().values()]
    rest = shape.parameters - sum(linear)
    assert abs(NF4_BITS - 4.127) < 1e-3  # bitsandbytes' double quantisation
    expected = int(rest * 2 + sum(linear) * NF4_BITS / 8) + max(linear) * 2
    assert nf4.weights_bytes - auto.weights_bytes == expected - shape.parameters * 2
    assert nf4.activations_bytes == auto.activations_bytes
    assert nf4.trained_state_bytes == auto.trained_state_bytes
    assert nf4.as_dict()["base_precision"] == "nf4"


def test_a_7b_shaped_base_takes_about_a_quarter_of_its_bf16_bytes_in_nf4():
    from peft_engine.memory import ModelShape

    h, i, layers, vocab = 4096, 11008, 32, 32000
    shapes = {"model.embed_tokens.weight": (vocab, h), "lm_head.weight": (vocab, h)}
    for n in range(layers):
        for name, size in {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h)}.items():
            shapes[f"model.layers.{n}.self_attn.{name}_proj.weight"] = size
        for name, size in {"gate": (i, h), "up": (i, h), "down": (h, i)}.items():
            shapes[f"model.layers.{n}.mlp.{name}_proj.weight"] = size
        shapes[f"model.layers.{n}.input_layernorm.weight"] = (h,)
    shape = ModelShape("llama", h, i, layers, 32, 32, 128, vocab, True, shapes)
    kw = {"tokens": 1, "precision": "bf16", "checkpointing": True}
    bf16 = estimate_memory(shape, LoraMethod(), **kw).weights_bytes
    nf4 = estimate_memory(shape, LoraMethod(), base_precision="nf4", **kw).weights_bytes
    # 6.48B linear weights at 4.127 bits (3.34 GB), 0.26B embedding and head parameters at
    # 16 (0.52 GB), the widest layer dequantised (0.09 GB), LoRA's bf16 copies (0.08 GB)
    assert 3.9e9 < nf4 < 4.1e9 and 0.28 < nf4 / bf16 < 0.31


def _random_llama(directory: Path, hidden: int, layers: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": hidden, "intermediate_size": hidden * 11 // 4, "vocab_size": 1024}
    heads = {"num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2}
    LlamaForCausalLM(LlamaConfig(**shape, **heads)).save_pretrained(directory)
    return directory


def _held_bytes(model) -> int:
    """Every parameter and buffer's bytes, and the 4-bit weights' quantisation constants."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            constants = state.as_dict(packed=True).values()
            total += sum(v.numel() * v.element_size() for v in constants if torch.is_tensor(v))
    return total


@needs_cpu_4bit
def test_the_estimates_nf4_weights_are_the_bytes_bitsandbytes_holds(tmp_path):
    """Measured: 1.0% more than the estimate (each 4-bit tensor's code tables, 1 KB)."""
    from transformers import AutoModelForCausalLM

    from peft_engine.memory import frozen_bytes
    from peft_engine.quantization import load_nf4

    directory = _random_llama(tmp_path / "w256", 256, 2)
    model = load_nf4(AutoModelForCausalLM, directory, dtype=torch.bfloat16,
                     device=torch.device("cpu"))  # fmt: skip
    # frozen, and peft's float32 upcast undone: the rest of the base in the compute dtype
    assert not any(p.requires_grad for p in model.parameters())
    floats = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert floats == {torch.bfloat16}
    shape = read_model_shape(directory)
    widest = max(i * o for i, o in shape.linear_layers().values())
    estimate = frozen_bytes(shape, shape.parameters, 2, "nf4") - widest * 2  # less the transient
    assert estimate == pytest.approx(_held_bytes(model), rel=0.02)


def test_job_memory_reads_base_precision_from_the_spec(tiny_model_dir):
    from peft_engine.spec import DatasetStats, ModelLimits, resolve_spec

    stats = DatasetStats(n_train=64, n_validation=0, max_tokens=40, mean_tokens=30.0)
    for precision in ("auto", "nf4"):
        spec = parse_spec(_nf4(hyperparameters={"base_precision": precision}))
        resolved = resolve_spec(spec, stats, ModelLimits(512))
        memory = job_memory(tiny_model_dir, resolved, longest_sequence=40)
        assert memory["base_precision"] == precision


# ------------------------------------------------------------------- real runs on a CPU


def _lora_layers(model):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return [m for m in model.modules() if isinstance(m, LoraLinear4bit)]


@needs_cpu_4bit
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_trains_on_cpu_through_peft_s_4bit_lora_layers(
    precision, tmp_path, data, tiny_registry, cache_dir
):
    from peft_engine.methods.lora_fused import FALLBACKS

    fallbacks = sum(FALLBACKS.values())
    result = _run(_spec(base_precision="nf4", precision=precision), tmp_path / "run", data,
                  tiny_registry, cache_dir)  # fmt: skip

    assert result.status == "succeeded" and is_quantized(result.model)
    metrics = result.result["metrics"]
    assert metrics["best"]["eval_loss"] < metrics["initial"]["eval_loss"] - 0.1
    losses = _train_losses(tmp_path / "run")
    assert losses[18] < losses[1]
    # every adapted layer is peft's own 4-bit LoRA layer, which the fused path leaves alone
    layers = _lora_layers(result.model)
    assert len(layers) == 2 * 7 and not any(hasattr(m, "_peft_forward") for m in layers)
    assert sum(FALLBACKS.values()) == fallbacks
    trained = [p for p in result.model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # master weights
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert (result.output_dir / "adapter_model.safetensors").is_file()
    assert "Trained with QLoRA" in (result.output_dir / "README.md").read_text()


@needs_cpu_4bit
def test_the_adapter_reloads_onto_4bit_and_float32_bases_and_merges_into_float32(
    tmp_path, data, tiny_registry, cache_dir, tiny_model_dir
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_engine.quantization import load_nf4

    result = _run(_spec(base_precision="nf4"), tmp_path / "run", data, tiny_registry, cache_dir)
    adapter = result.output_dir
    inputs = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=inputs).logits.float()

    trained = logits(result.model)
    base4 = load_nf4(AutoModelForCausalLM, tiny_model_dir, dtype=torch.float32,
                     device=torch.device("cpu"))  # fmt: skip
    reloaded4 = logits(PeftModel.from_pretrained(base4, adapter))
    assert torch.allclose(reloaded4, trained, atol=1e-5)

    # the documented merge path (README, "QLoRA"): a full-precision base, not the 4-bit one
    base32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base32, adapter)
    unmerged = logits(with_adapter)
    merged_dir = tmp_path / "merged"
    with_adapter.merge_and_unload().save_pretrained(merged_dir)
    merged = logits(AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32))
    assert torch.allclose(merged, unmerged, atol=1e-4)
    # the float32 base is not the quantised one it trained on: close, not equal
    gap = (merged - trained).abs().max().item()
    assert 1e-4 < gap < 0.2, gap


@needs_cpu_4bit
def test_dpo_runs_on_a_4bit_base_its_reference_the_adapter_disabled(
    tmp_path, tiny_registry, cache_dir
):
    from tests.preference_helpers import PAIRS

    pairs = DataPaths(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    spec = {
        "model": "tiny-llama",
        "validation_split": 0.25,
        "method": {"type": "lora", "objective": {"type": "dpo", "beta": 0.1}},
        "hyperparameters": {"base_precision": "nf4", "packing": False, "n_epochs": 2,
                            "batch_size": 4, "learning_rate": 3e-3},
    }  # fmt: skip
    result = _run(spec, tmp_path / "run", pairs, tiny_registry, cache_dir)
    assert result.status == "succeeded" and is_quantized(result.model)
    metrics = result.result["metrics"]
    assert metrics["best"]["eval_loss"] < metrics["initial"]["eval_loss"]


@needs_cpu_4bit
def test_checkpointing_and_resume_give_the_losses_of_one_plain_run(
    tmp_path, data, tiny_registry, cache_dir
):
    from tests.test_gradient_checkpointing import _checkpointing_on

    def run(workdir, hooks=None, **kw):
        spec = _spec(base_precision="nf4", checkpoint_every_steps=3, **kw.pop("hp", {}))
        return _run(spec, workdir, data, tiny_registry, cache_dir, hooks, **kw)

    plain = run(tmp_path / "plain")
    assert not _checkpointing_on(plain.model)  # peft's preparation did not turn it on
    assert run(tmp_path / "split", stop_after(7), hp={"gradient_checkpointing": True}).status == (
        "stopped"
    )
    resumed = run(tmp_path / "split", hp={"gradient_checkpointing": True},
                  resume_from=tmp_path / "split" / "checkpoints" / "checkpoint-6")  # fmt: skip
    assert resumed.status == "succeeded" and _checkpointing_on(resumed.model)
    expected, got = _train_losses(tmp_path / "plain"), _train_losses(tmp_path / "split")
    assert sorted(got) == sorted(expected) == list(range(1, 19))
    for step in range(1, 19):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


# ----------------------------------------------------------------------------- on CUDA


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_qlora_trains_on_cuda(precision, tmp_path, data, tiny_registry, cache_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_engine.quantization import load_nf4

    assert four_bit_missing("cuda") is None
    result = _run(_spec(base_precision="nf4", precision=precision), tmp_path / "run", data,
                  tiny_registry, cache_dir)  # fmt: skip
    assert result.status == "succeeded" and is_quantized(result.model)
    assert all(p.device.type == "cuda" for p in result.model.parameters())
    metrics = result.result["metrics"]
    assert metrics["best"]["eval_loss"] < metrics["initial"]["eval_loss"]
    assert _lora_layers(result.model)
    base = load_nf4(AutoModelForCausalLM, tiny_registry.get("tiny-llama").source.path,
                    dtype=torch.bfloat16, device=torch.device("cuda"))  # fmt: skip
    assert is_quantized(PeftModel.from_pretrained(base, result.output_dir))


@pytest.mark.gpu
@needs_cuda
def test_a_4bit_base_on_cuda_takes_the_memory_the_estimate_says(tmp_path):
    from transformers import AutoModelForCausalLM

    from peft_engine.memory import frozen_bytes
    from peft_engine.quantization import load_nf4

    directory = _random_llama(tmp_path / "w1024", 1024, 4)
    shape = read_model_shape(directory)
    widest = max(i * o for i, o in shape.linear_layers().values())
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_nf4(AutoModelForCausalLM, directory, dtype=torch.bfloat16,
                     device=torch.device("cuda"))  # fmt: skip
    held = torch.cuda.memory_allocated() - before
    estimate = frozen_bytes(shape, shape.parameters, 2, "nf4") - widest * 2
    assert is_quantized(model) and estimate == pytest.approx(held, rel=0.1)
    assert held < 0.4 * shape.parameters * 2  # against the bf16 base's bytes


# ------------------------------------------------------------------------ bench/gpu


def test_the_gpu_check_script_parses_and_the_bench_prints_its_help():
    assert subprocess.run(["bash", "-n", str(REPO / "bench/gpu/check.sh")]).returncode == 0
    shown = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu/throughput.py"), "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "--steps" in shown.stdout and "--rows" in shown.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="says what it says without CUDA")
def test_the_throughput_bench_refuses_cleanly_without_cuda():
    ran = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu/throughput.py"), "--steps", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 2
    assert "needs a CUDA GPU" in ran.stderr and "Traceback" not in ran.stderr
