"""The worker's resident base models (peft_engine.models.resident) on tiny random models.

A job through the cache must be the job without it, bit for bit, whatever ran before it on
the same base model: methods that train base weights (full, PiSSA) get a copy, methods
that only read them share it, and neither may change what the next job starts from. The
cache stays within its bounds, and tied weights stay tied.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_engine import DataPaths, train
from peft_engine.models import load_registry
from peft_engine.models.heads import load_body
from peft_engine.models.loading import load_causal_lm
from peft_engine.models.resident import ResidentLoader, ResidentModels, shares_base_weights
from peft_engine.spec import parse_spec
from tests.conftest import (
    build_tiny_bert,
    build_tiny_llama,
    chat,
    local_model,
    write_jsonl,
    write_registry,
)

QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(24)]
REVIEWS = [
    {"text": f"the {noun} was {word}", "label": label}
    for noun in ("film", "movie", "plot")
    for word, label in {"great": "pos", "good": "pos", "awful": "neg", "bad": "neg"}.items()
]
LORA = {"type": "lora", "r": 4, "alpha": 8}
FULL = {"type": "full"}
PISSA = {**LORA, "init": "pissa"}


def _tiny_llama(directory: Path, tokenizer, *, tied: bool, seed: int = 0) -> Path:
    tokenizer.save_pretrained(directory)
    return build_tiny_llama(directory, vocab_size=len(tokenizer), tied=tied, seed=seed)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """Ties its LM head to the embeddings, as SmolLM2 does."""
    return _tiny_llama(tmp_path_factory.mktemp("tied-llama"), tiny_tokenizer, tied=True)


@pytest.fixture(scope="module")
def other_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("other-llama"), tiny_tokenizer, tied=False, seed=1)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tied_llama_dir, tiny_bert_dir):
    entries = {
        "tied-llama": local_model(tied_llama_dir, "llama", ["causal_lm"]),
        "tiny-bert": local_model(tiny_bert_dir, "bert", ["seq_classification"]),
    }
    path = write_registry(tmp_path_factory.mktemp("resident-registry") / "models.json", entries)
    return load_registry(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, DataPaths]:
    folder = tmp_path_factory.mktemp("resident-data")
    return {
        "causal_lm": DataPaths(write_jsonl(folder / "chat.jsonl", QUESTIONS)),
        "seq_classification": DataPaths(write_jsonl(folder / "reviews.jsonl", REVIEWS)),
    }


def _spec(method: dict, *, task: str = "causal_lm", **hyperparameters) -> dict:
    return {
        "model": "tied-llama" if task == "causal_lm" else "tiny-bert",
        "task": task,
        "method": method,
        "validation_split": 0.25,
        "hyperparameters": {
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "eval_every_steps": 3,
            **hyperparameters,
        },
    }


class Runs:
    """Jobs run one after another in one process, as a worker runs them."""

    def __init__(self, tmp_path: Path, registry, data, cache_dir: Path) -> None:
        self.tmp_path, self.registry, self.data, self.cache_dir = (
            tmp_path,
            registry,
            data,
            cache_dir,
        )
        self.count = 0
        self.sources: list[str] = []  # where each base model came from: "disk" or "resident"

    def run(self, spec: dict, resident: ResidentModels | None = None) -> dict:
        """The job's outcome: its metrics (times left out) and its output tensors."""
        self.count += 1
        workdir = self.tmp_path / f"job-{self.count}"
        data = self.data[spec.get("task", "causal_lm")]
        if resident is None:
            result = train(
                spec, workdir, data=data, registry=self.registry, cache_dir=self.cache_dir
            )
        else:
            with resident.active(
                report=lambda _, info: self.sources.append(info["base_model_source"])
            ):
                result = train(
                    spec, workdir, data=data, registry=self.registry, cache_dir=self.cache_dir
                )
        assert result.status == "succeeded"
        return _outcome(result.output_dir)


def _outcome(output_dir: Path) -> dict:
    timed = {"tokens_per_second", "eta_seconds"}
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in timed}
        for line in (output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    tensors = {}
    for file in sorted(output_dir.glob("*.safetensors")):
        tensors |= {f"{file.name}:{k}": v for k, v in load_file(file).items()}
    assert metrics and tensors
    return {"metrics": metrics, "tensors": tensors}


def _assert_same(outcome: dict, reference: dict) -> None:
    assert outcome["metrics"] == reference["metrics"]  # the loss curve, exactly
    assert outcome["tensors"].keys() == reference["tensors"].keys()
    for name, tensor in reference["tensors"].items():
        assert torch.equal(outcome["tensors"][name], tensor), name


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def runs(tmp_path, registry, data, cache_dir) -> Runs:
    return Runs(tmp_path, registry, data, cache_dir)


@pytest.fixture(scope="module")
def references(tmp_path_factory, registry, data, cache_dir) -> dict[str, dict]:
    """Each job run without a cache: what the same job through the cache must give."""
    plain = Runs(tmp_path_factory.mktemp("references"), registry, data, cache_dir)
    return {
        "lora": plain.run(_spec(LORA)),
        "full": plain.run(_spec(FULL)),
        "pissa": plain.run(_spec(PISSA)),
        "classifier": plain.run(_spec(LORA, task="seq_classification")),
    }


# ---------------------------------------------------------------------------------------
# Jobs through the cache are the jobs without it
# ---------------------------------------------------------------------------------------


def test_a_warm_job_is_bit_identical_to_one_without_the_cache(runs, references):
    resident = ResidentModels()
    _assert_same(runs.run(_spec(LORA), resident), references["lora"])
    _assert_same(runs.run(_spec(LORA), resident), references["lora"])
    assert runs.sources == ["disk", "resident"]


def test_jobs_after_jobs_that_train_base_weights_start_from_the_pristine_ones(
    runs, references, tied_llama_dir
):
    resident = ResidentModels()
    _assert_same(runs.run(_spec(LORA), resident), references["lora"])
    _assert_same(runs.run(_spec(FULL), resident), references["full"])  # trains every weight
    _assert_same(runs.run(_spec(PISSA), resident), references["pissa"])  # rewrites the base
    _assert_same(runs.run(_spec(LORA), resident), references["lora"])
    _assert_same(runs.run(_spec(FULL), resident), references["full"])
    # Never reloaded: what they trained was their own copy, not the resident weights.
    assert runs.sources == ["disk", *["resident"] * 4]
    kept = _load(resident, tied_llama_dir)
    pristine = _weights(load_causal_lm(tied_llama_dir))
    assert _weights(kept).keys() == pristine.keys()
    assert all(torch.equal(v, pristine[k]) for k, v in _weights(kept).items())


def test_a_classifier_gets_its_seeded_head_on_the_resident_body(runs, references):
    resident = ResidentModels()
    spec = _spec(LORA, task="seq_classification")
    _assert_same(runs.run(spec, resident), references["classifier"])
    _assert_same(runs.run(spec, resident), references["classifier"])
    assert runs.sources == ["disk", "resident"]


# Methods that share the resident tensors, each with the smallest spec that trains.
SHARING_SPECS = {
    "lora": (LORA, "causal_lm"),
    "dora": ({**LORA, "use_dora": True}, "causal_lm"),
    "adalora": ({"type": "adalora", "init_r": 6, "target_r": 2, "alpha": 8}, "causal_lm"),
    "loha": ({"type": "loha", "r": 4, "alpha": 8}, "causal_lm"),
    "lokr": ({"type": "lokr", "r": 4, "alpha": 8}, "causal_lm"),
    "ia3": ({"type": "ia3"}, "causal_lm"),
    "vera": ({"type": "vera", "r": 16}, "causal_lm"),
    "oft": ({"type": "oft", "block_size": 8}, "causal_lm"),
    "prompt_tuning": ({"type": "prompt_tuning", "num_virtual_tokens": 4}, "causal_lm"),
    "p_tuning": (
        {"type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
        "causal_lm",
    ),
    "prefix_tuning": ({"type": "prefix_tuning", "num_virtual_tokens": 4}, "causal_lm"),
    "bottleneck_adapter": ({"type": "bottleneck_adapter", "bottleneck": 8}, "causal_lm"),
    "head_only": ({"type": "head_only"}, "seq_classification"),
}


@pytest.mark.parametrize("name", sorted(SHARING_SPECS))
def test_a_method_that_shares_the_resident_weights_never_changes_them(
    name, runs, tied_llama_dir, tiny_bert_dir
):
    method, task = SHARING_SPECS[name]
    spec = _spec(method, task=task, max_steps=2)
    assert shares_base_weights(parse_spec(spec).method)
    resident = ResidentModels()
    runs.run(spec, resident)
    # The loaders as the tasks call them (the tiny BERT's classifier pools with its pooler).
    load = (
        partial(load_causal_lm, tied_llama_dir)
        if task == "causal_lm"
        else partial(load_body, tiny_bert_dir, with_pooler=True)
    )
    with resident.active(report=lambda _, info: runs.sources.append(info["base_model_source"])):
        kept = load(resident=ResidentLoader(resident, share=True))
    assert runs.sources == ["disk", "resident"]  # found unwritten: not loaded again
    expected = _weights(load())
    assert all(torch.equal(v, expected[k]) for k, v in _weights(kept).items())


def test_methods_that_train_base_weights_never_share_them():
    for method in (FULL, PISSA, {**LORA, "init": "olora"}, {"type": "bitfit"}):
        assert not shares_base_weights(parse_spec(_spec(method)).method), method
    layerwise = {"type": "layerwise_unfreeze"}
    assert not shares_base_weights(parse_spec(_spec(layerwise)).method)


# ---------------------------------------------------------------------------------------
# The cache itself
# ---------------------------------------------------------------------------------------


def _load(resident: ResidentModels, path: Path, *, share: bool = True) -> torch.nn.Module:
    return load_causal_lm(path, resident=ResidentLoader(resident, share))


def _sources(resident: ResidentModels, *paths: Path) -> list[str]:
    seen: list[str] = []
    with resident.active(report=lambda _, info: seen.append(info["base_model_source"])):
        for path in paths:
            _load(resident, path)
    return seen


def test_weights_written_in_place_are_never_served_again(tied_llama_dir):
    resident = ResidentModels()
    pristine = _weights(load_causal_lm(tied_llama_dir))
    model = _load(resident, tied_llama_dir, share=True)
    with torch.no_grad():  # what an optimizer step on a shared weight would do
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert _sources(resident, tied_llama_dir) == ["disk"]
    again = _weights(_load(resident, tied_llama_dir))
    assert all(torch.equal(v, pristine[k]) for k, v in again.items())


def test_the_count_bound_evicts_the_least_recently_used(tied_llama_dir, other_llama_dir):
    resident = ResidentModels(max_models=1)
    order = [tied_llama_dir, tied_llama_dir, other_llama_dir, tied_llama_dir]
    assert _sources(resident, *order) == ["disk", "resident", "disk", "disk"]
    assert len(resident) == 1
    two = ResidentModels(max_models=2)
    assert _sources(two, *order) == ["disk", "resident", "disk", "resident"]
    assert len(two) == 2


def test_the_byte_bound_evicts_and_never_keeps_a_model_too_big(tied_llama_dir, other_llama_dir):
    one_model = ResidentModels(max_models=8)
    _load(one_model, tied_llama_dir)
    size = one_model.nbytes
    assert size > 0

    too_small = ResidentModels(max_bytes=size - 1)
    assert _sources(too_small, tied_llama_dir, tied_llama_dir) == ["disk", "disk"]
    assert len(too_small) == 0 and too_small.nbytes == 0

    room_for_one = ResidentModels(max_models=8, max_bytes=size + size // 2)
    order = [tied_llama_dir, other_llama_dir, tied_llama_dir]
    assert _sources(room_for_one, *order) == ["disk", "disk", "disk"]
    assert len(room_for_one) == 1 and room_for_one.nbytes <= size + size // 2


def test_no_cache_keeps_nothing(tied_llama_dir):
    disabled = ResidentModels(max_models=0)
    assert _sources(disabled, tied_llama_dir, tied_llama_dir) == ["disk", "disk"]
    assert len(disabled) == 0


@pytest.mark.parametrize("share", [True, False])
def test_tied_weights_stay_tied(tied_llama_dir, share):
    resident = ResidentModels()
    first = _load(resident, tied_llama_dir, share=share)  # built from what was just loaded
    second = _load(resident, tied_llama_dir, share=share)  # built from the resident copy
    for model in (first, second):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    shared = first.lm_head.weight.data_ptr() == second.lm_head.weight.data_ptr()
    assert shared == share


def test_changed_weight_files_are_loaded_again(tmp_path, tiny_tokenizer):
    directory = _tiny_llama(tmp_path / "model", tiny_tokenizer, tied=False)
    resident = ResidentModels()
    _load(resident, directory)
    _tiny_llama(directory, tiny_tokenizer, tied=False, seed=7)  # the operator replaces it
    assert _sources(resident, directory) == ["disk"]
    reloaded = _weights(_load(resident, directory))
    replaced = _weights(load_causal_lm(directory))
    assert all(torch.equal(v, replaced[k]) for k, v in reloaded.items())


def test_tokenizers_are_kept_only_while_a_cache_is_active(tied_llama_dir):
    from peft_engine.models.loading import load_tokenizer

    resident = ResidentModels()
    with resident.active():
        first, again = load_tokenizer(tied_llama_dir), load_tokenizer(tied_llama_dir)
    assert first is again
    assert load_tokenizer(tied_llama_dir) is not first
