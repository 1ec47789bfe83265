"""The vLLM serving check (peft_engine/serving.py): real adapters trained on a tiny Llama,
read the way vLLM's LoRA loader reads them (without vLLM), and the jobs whose result it
could not load, refused at POST /jobs naming the field."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterator

import pytest

from peft_engine import DataPaths, train
from peft_engine.errors import SpecError
from peft_engine.models import ModelEntry, ModelRegistry, ModelSource
from peft_engine.serving import (
    AdapterNotServable,
    check_adapter_files,
    check_serving_model,
    vllm_max_lora_rank,
)
from peft_engine.spec import parse_spec
from tests.api_helpers import TRAIN_ROWS, DeployedApi, assert_problem, deployed_api, job_spec
from tests.api_helpers import upload as upload_rows
from tests.conftest import write_jsonl
from tests.service_fixtures import auth

VLLM = {"target": "vllm"}
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _train(tmp_path, tiny_registry, cache_dir, method, **extra):
    spec = {
        "model": "tiny-llama",
        "method": method,
        "validation_split": 0.0,
        "hyperparameters": {"n_epochs": 1, "batch_size": 4, "max_steps": 2, "max_seq_length": 64},
        **extra,
    }
    data = DataPaths(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS))
    result = train(
        spec, tmp_path / "run", None, data=data, registry=tiny_registry, cache_dir=cache_dir
    )
    assert result.status == "succeeded"
    return result.output_dir


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_registry, cache_dir):
    """A LoRA adapter a job with serving.target vllm wrote: rank 8 on every projection."""
    method = {"type": "lora", "r": 8, "alpha": 16}
    return _train(tmp_path_factory.mktemp("lora"), tiny_registry, cache_dir, method, serving=VLLM)


def test_a_trained_lora_adapter_passes_vllms_loading_rules(lora_adapter):
    served = check_adapter_files(lora_adapter, "llama")

    assert served.rank == 8 and served.max_lora_rank == 8
    assert set(served.modules) == PROJECTIONS  # peft's all-linear: every projection, no lm_head
    config = json.loads((lora_adapter / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config)  # PEFTHelper's required keys
    assert not config.get("modules_to_save") and config["bias"] == "none"
    assert not config["use_dora"]
    names = _header(lora_adapter / "adapter_model.safetensors")
    for name, info in names.items():
        assert name.startswith("base_model.model.model.layers."), name
        assert name.endswith((".lora_A.weight", ".lora_B.weight")), name
        rank_axis = 0 if name.endswith("lora_A.weight") else 1
        assert info["shape"][rank_axis] == 8, (name, info["shape"])


@pytest.mark.parametrize(
    ("method", "rank", "modules"),
    [
        # PiSSA is converted back to a plain LoRA on the original base, of rank 2r
        ({"type": "lora", "r": 4, "alpha": 8, "init": "pissa"}, 8, PROJECTIONS),
        ({"type": "lora", "r": 4, "alpha": 8, "use_rslora": True}, 4, PROJECTIONS),
        # LoRA on the embeddings: lora_embedding_A/B, which vLLM's Llama takes
        (
            {"type": "lora", "r": 4, "target_modules": ["q_proj", "embed_tokens"]},
            4,
            {"q_proj", "embed_tokens"},
        ),
    ],
    ids=["pissa", "rslora", "embeddings"],
)
def test_other_lora_variants_pass_with_the_rank_they_are_saved_at(
    tmp_path, tiny_registry, cache_dir, method, rank, modules
):
    out = _train(tmp_path, tiny_registry, cache_dir, method, serving=VLLM)

    served = check_adapter_files(out, "llama")

    assert (served.rank, set(served.modules)) == (rank, modules)


@pytest.mark.parametrize(
    ("method", "param"),
    [
        ({"type": "lora", "r": 4, "alpha": 8, "use_dora": True}, "adapter_config.json:use_dora"),
        ({"type": "prompt_tuning", "num_virtual_tokens": 4}, "adapter_config.json:peft_type"),
        ({"type": "ia3"}, "adapter_config.json:peft_type"),
    ],
    ids=["dora", "prompt_tuning", "ia3"],
)
def test_adapters_vllm_cannot_load_are_refused_naming_the_key(
    tmp_path, tiny_registry, cache_dir, method, param
):
    out = _train(tmp_path, tiny_registry, cache_dir, method)

    with pytest.raises(AdapterNotServable) as refused:
        check_adapter_files(out, "llama")
    assert refused.value.param == param


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rename_tensors(directory, old, new):
    """Rewrite the safetensors header with `old` replaced by `new` in every tensor name."""
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header = {name.replace(old, new): info for name, info in header.items()}
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])


def _header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return {k: v for k, v in json.loads(data[8 : 8 + length]).items() if k != "__metadata__"}


@pytest.mark.parametrize(
    ("edit", "param"),
    [
        (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda d: _edit_config(d, use_dora=True), "use_dora"),
        (lambda d: _edit_config(d, bias="all"), "bias"),
        (lambda d: _edit_config(d, r=1024), "r"),
        (lambda d: _edit_config(d, r=4), "model.layers.0."),  # the shapes say 8
        (lambda d: _edit_config(d, rank_pattern={"q_proj": 4}), "rank_pattern"),
        (lambda d: _rename_tensors(d, "lora_B.weight", "lora_magnitude_vector"), "lora_magnitude"),
        (lambda d: _rename_tensors(d, "mlp.down_proj", "mlp.act_fn"), "act_fn"),
    ],
    ids=[
        "modules_to_save",
        "dora",
        "bias",
        "rank",
        "rank_mismatch",
        "rank_pattern",
        "dora_tensor",
        "non_linear_target",
    ],
)
def test_what_vllms_loader_refuses_is_refused(tmp_path, lora_adapter, edit, param):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    edit(adapter)

    with pytest.raises(AdapterNotServable) as refused:
        check_adapter_files(adapter, "llama")
    assert param in refused.value.param, refused.value


def test_a_family_without_vllm_lora_support_is_refused(lora_adapter):
    with pytest.raises(AdapterNotServable) as refused:
        check_adapter_files(lora_adapter, "gpt2")
    assert refused.value.param == "family"


def test_the_max_lora_rank_to_serve_with_is_the_next_value_vllm_accepts():
    assert [vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [
        1,
        8,
        8,
        16,
        64,
        320,
        512,
    ]


# ---------------------------------------------------------------------------------------
# Through the API: refused at POST /jobs, before any data is tokenized or GPU time spent
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_registry_file) -> Iterator[DeployedApi]:
    home = tmp_path_factory.mktemp("serving-api")
    with deployed_api("sqlite", home, tiny_registry_file, "team-a") as deployed:
        yield deployed


@pytest.fixture(scope="module")
def training_file(api) -> str:
    return upload_rows(api.client, api.keys[0], TRAIN_ROWS)


@pytest.mark.parametrize(
    "method",
    [
        {"type": "lora", "r": 4, "alpha": 8},
        {"type": "lora", "r": 256, "init": "pissa"},  # saved as rank 512, vLLM's largest
        {"type": "lora", "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
        {"type": "lora", "target_modules": ["model.layers.0.self_attn.o_proj", "lm_head"]},
    ],
    ids=["lora", "pissa_512", "rslora_targets", "paths_and_lm_head"],
)
def test_a_lora_job_vllm_can_serve_is_accepted(api, training_file, method):
    # tiny-llama's registry entry names no family: its config.json's model_type does
    spec = job_spec(training_file, method=method, serving=VLLM)

    response = api.client.post("/jobs?dry_run=true", headers=auth(api.keys[0]), json=spec)

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "task", "field"),
    [
        ({"type": "lora", "use_dora": True}, None, "method.use_dora"),
        ({"type": "prompt_tuning"}, None, "method.type"),
        ({"type": "prefix_tuning"}, None, "method.type"),
        ({"type": "adalora"}, None, "method.type"),
        ({"type": "ia3"}, None, "method.type"),
        ({"type": "full"}, None, "method.type"),
        ({"type": "lora", "r": 1024}, None, "method.r"),
        ({"type": "lora", "r": 300, "init": "pissa"}, None, "method.r"),  # saved as rank 600
        (
            {"type": "lora", "target_modules": ["q_proj", "input_layernorm"]},
            None,
            "method.target_modules",
        ),
        ({"type": "lora"}, "seq_classification", "task"),  # a new head: modules_to_save
    ],
    ids=[
        "dora",
        "prompt_tuning",
        "prefix_tuning",
        "adalora",
        "ia3",
        "full",
        "rank",
        "pissa_rank",
        "non_linear_target",
        "classification_head",
    ],
)
def test_a_job_vllm_could_not_serve_is_refused_naming_the_field(
    api, training_file, method, task, field
):
    spec = job_spec(training_file, method=method, serving=VLLM)
    if task:
        spec["task"] = task

    problem = assert_problem(api.client.post("/jobs", headers=auth(api.keys[0]), json=spec), 422)

    assert problem["param"] == field, problem
    assert "vLLM" in problem["detail"], problem


def test_the_same_job_without_a_serving_target_is_not_checked(api, training_file):
    spec = job_spec(training_file, method={"type": "lora", "use_dora": True})

    response = api.client.post("/jobs?dry_run=true", headers=auth(api.keys[0]), json=spec)

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("family", "targets", "refused"),
    [
        ("llama", ["q_proj", "embed_tokens", "lm_head"], False),
        ("mistral", ["gate_proj", "embed_tokens"], False),
        ("qwen2", ["q_proj", "embed_tokens"], True),  # vLLM's Qwen2 has no embedding_modules
        ("qwen3", ["k_proj", "q_norm"], True),  # a norm is no linear layer
        ("qwen3", "all-linear", False),
    ],
)
def test_targets_are_judged_against_the_familys_vllm_modules(tmp_path, family, targets, refused):
    entry = ModelEntry(
        name="m",
        source=ModelSource(type="local", path=tmp_path),
        family=family,
        tasks=("causal_lm",),
    )
    spec = parse_spec({"model": "m", "method": {"target_modules": targets}, "serving": VLLM})

    if not refused:
        check_serving_model(spec, ModelRegistry([entry]), tmp_path)
        return
    with pytest.raises(SpecError) as error:
        check_serving_model(spec, ModelRegistry([entry]), tmp_path)
    assert error.value.param == "method.target_modules"


def test_a_model_family_vllm_cannot_serve_lora_on_is_refused(tmp_path):
    entry = ModelEntry(
        name="m",
        source=ModelSource(type="local", path=tmp_path),
        family="gpt2",
        tasks=("causal_lm",),
    )
    spec = parse_spec({"model": "m", "serving": VLLM})

    with pytest.raises(SpecError) as error:
        check_serving_model(spec, ModelRegistry([entry]), tmp_path)
    assert error.value.param == "model"
