"""The method catalogue as one parametrised table, method × task, on tiny random models
(DESIGN §8, issue 6).

Causal LM runs on a tiny Llama; sequence and token classification on a tiny BERT (plus a
Llama sequence classifier, which pools its last token). For every pair a method supports:
a short run lowers the eval loss; only the intended parameters change (everything else is
bit-identical to the pretrained weights); the trainable count is what the method promises;
the output reloads in a fresh process and gives the engine's outputs; the model card says
how to load it. A resumed run continues exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_engine import DataPaths, train
from peft_engine.errors import SpecError
from peft_engine.methods import METHODS
from peft_engine.methods.common import TEXT_TASKS
from peft_engine.methods.weights import TRAINED_WEIGHTS_FILE
from peft_engine.models import load_registry
from tests.conftest import (
    build_tiny_bert,
    chat,
    local_model,
    logits_from_plain_peft,
    write_jsonl,
    write_registry,
)
from tests.engine_helpers import stop_after

# ---------------------------------------------------------------------------------------
# Tiny models and data
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A decoder with bias terms, for BitFit on causal LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        bos_token_id=2,
        eos_token_id=2,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_model_dir, tiny_bert_dir, tiny_gpt2_dir):
    entries = {
        "tiny-llama": local_model(tiny_model_dir, "llama", list(TEXT_TASKS)),
        "tiny-gpt2": local_model(tiny_gpt2_dir, "gpt2", ["causal_lm"]),
        "tiny-bert": local_model(
            tiny_bert_dir, "bert", ["seq_classification", "token_classification"]
        ),
    }
    path = write_registry(tmp_path_factory.mktemp("table-registry") / "models.json", entries)
    return load_registry(path)


QUESTIONS = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(32)]
SENTIMENT = {"great": "positive", "good": "positive", "awful": "negative", "bad": "negative"}
REVIEWS = [
    {"text": f"the {noun} was {word}", "label": label}
    for noun in ("film", "movie", "plot", "a film")
    for word, label in SENTIMENT.items()
] * 2
ENTITIES = {"alice": "PER", "bob": "PER", "carol": "PER", "paris": "LOC", "rome": "LOC"}


def _sentence(i: int) -> dict:
    people, places = ["alice", "bob", "carol"], ["paris", "rome"]
    tokens = [people[i % 3], "visited", places[i % 2], "and", "saw", people[(i + 1) % 3]]
    if i % 4 == 0:
        tokens = ["the", "film", "was", "good", "in", places[i % 2]]
    tags = [f"B-{ENTITIES[t]}" if t in ENTITIES else "O" for t in tokens]
    return {"tokens": tokens, "tags": tags}


SENTENCES = [_sentence(i) for i in range(32)]
DATA = {"causal_lm": QUESTIONS, "seq_classification": REVIEWS, "token_classification": SENTENCES}

# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

# Small settings per method so tiny models train in seconds; hyperparameter overrides too.
METHOD_SPECS: dict[str, tuple[dict, dict]] = {
    "lora": ({"type": "lora", "r": 4, "alpha": 8}, {}),
    "adalora": (
        {"type": "adalora", "init_r": 6, "target_r": 2, "alpha": 8},
        {"learning_rate": 5e-3},
    ),
    "loha": ({"type": "loha", "r": 4, "alpha": 8}, {}),
    "lokr": ({"type": "lokr", "r": 4, "alpha": 8}, {}),
    "ia3": ({"type": "ia3"}, {"learning_rate": 1e-2}),
    "vera": ({"type": "vera", "r": 16}, {"learning_rate": 1e-2}),
    "oft": ({"type": "oft", "block_size": 8}, {}),
    "prompt_tuning": ({"type": "prompt_tuning", "num_virtual_tokens": 4}, {"learning_rate": 3e-2}),
    "p_tuning": ({"type": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16}, {}),
    "prefix_tuning": ({"type": "prefix_tuning", "num_virtual_tokens": 4}, {"learning_rate": 3e-2}),
    "bottleneck_adapter": (
        {"type": "bottleneck_adapter", "bottleneck": 8},
        {"learning_rate": 5e-3},
    ),
    "bitfit": ({"type": "bitfit"}, {"learning_rate": 1e-2}),
    "head_only": ({"type": "head_only"}, {"learning_rate": 1e-2}),
    "layerwise_unfreeze": (
        {"type": "layerwise_unfreeze", "discriminative_lr": 2.6},
        {"learning_rate": 1e-3},
    ),
    "full": ({"type": "full"}, {"learning_rate": 1e-3}),
}
# Options that change how a method trains or saves, each run through the same table.
VARIANTS: dict[str, tuple[dict, dict]] = {
    "lora-dora": ({"type": "lora", "r": 4, "alpha": 8, "use_dora": True}, {}),
    "lora-rslora-gaussian": (
        {"type": "lora", "r": 4, "alpha": 8, "use_rslora": True, "init": "gaussian"},
        {},
    ),
    "lora-pissa": ({"type": "lora", "r": 4, "alpha": 8, "init": "pissa"}, {}),
    "lora-olora": ({"type": "lora", "r": 4, "alpha": 8, "init": "olora"}, {}),
    "layerwise-bottom-up-plateau": (
        {"type": "layerwise_unfreeze", "direction": "bottom_up", "unfreeze_every_steps": 4},
        {"learning_rate": 1e-3, "lr_scheduler": "reduce_on_plateau"},
    ),
}
CASES = {**METHOD_SPECS, **VARIANTS}
# Methods that move the base weights in memory on purpose (the output is converted back).
MUTATES_BASE = {"lora-pissa", "lora-olora"}


FAMILIES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-bert": "bert"}


def _model_for(task: str, case: str) -> str:
    if task != "causal_lm":
        return "tiny-bert"
    families = METHODS[CASES[case][0]["type"]].families
    return "tiny-llama" if families is None or "llama" in families else "tiny-gpt2"


def _supported(case: str, task: str) -> bool:
    if case in MUTATES_BASE and task != "causal_lm":
        return False  # refused by the spec (test_unsupported_pairs_are_refused...)
    method = METHODS[CASES[case][0]["type"]]
    family = FAMILIES[_model_for(task, case)]
    return task in method.tasks and (method.families is None or family in method.families)


TABLE = [(case, task) for case in CASES for task in TEXT_TASKS if _supported(case, task)]
# The Llama sequence classifier (last-token pooling) for a few methods.
TABLE += [("lora", "seq_classification@llama"), ("prefix_tuning", "seq_classification@llama")]


def test_the_table_covers_every_method_and_every_text_task():
    assert set(METHOD_SPECS) == set(METHODS)
    for method in METHODS.values():
        for task in set(method.tasks) & set(TEXT_TASKS):
            assert any(CASES[c][0]["type"] == method.type and t == task for c, t in TABLE), (
                method.type,
                task,
            )


# A classifier on a tiny random body needs a few more steps to move off the majority class.
TASK_SETTINGS = {"seq_classification": {"n_epochs": 5, "pooling": "mean"}}


def _spec(case: str, task: str, **hyperparameters) -> dict:
    task, _, model = task.partition("@")
    method, overrides = CASES[case]
    return {
        "model": f"tiny-{model}" if model else _model_for(task, case),
        "task": task,
        "validation_split": 0.25,
        "method": method,
        "hyperparameters": {
            "n_epochs": 3,
            "batch_size": 4,
            "eval_every_steps": 6,
            "checkpoint_every_steps": 6,
            "early_stopping": None,
            "learning_rate": 5e-3,  # tiny random models: large steps show a change quickly
        }
        | TASK_SETTINGS.get(task, {})
        | overrides
        | hyperparameters,
    }


def _data(tmp_path: Path, task: str) -> DataPaths:
    task = task.partition("@")[0]
    train = write_jsonl(tmp_path / "train.jsonl", DATA[task])
    if task != "seq_classification":
        return DataPaths(train)  # validation_split holds a quarter out
    # balanced, so that learning the training set's majority class cannot look like progress
    return DataPaths(train, write_jsonl(tmp_path / "validation.jsonl", REVIEWS[:16]))


def _original_weights(spec: dict, registry) -> dict[str, torch.Tensor]:
    """The pretrained weights under the names they have inside the engine's model."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = registry.get(spec["model"]).source.path
    if spec["task"] == "causal_lm":
        model = AutoModelForCausalLM.from_pretrained(path)
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    body = AutoModel.from_pretrained(path)
    return {f"body.{n}": p.detach().clone() for n, p in body.named_parameters()}


def _named_parameters(model) -> dict[str, torch.Tensor]:
    """The parameters under the base model's own names (peft's wrapping taken off); the
    trained copy of a task head counts as the head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    named = {}
    for name, p in base.named_parameters():
        if ".original_module." in name:
            continue
        named[name.replace(".base_layer", "").replace(".modules_to_save.default", "")] = p
    return named


# Reloads outputs in a process of its own, started once for the module (the training
# process's state cannot leak into it): one request a line, "ok" or the error back.
RELOAD_SERVER = """
import json, sys, traceback, torch
from safetensors.torch import load_file, save_file
from peft_engine import load_trained
for line in sys.stdin:
    request = json.loads(line)
    try:
        model = load_trained(request["output_dir"], request["base_dir"]).eval()
        with torch.no_grad():
            logits = model(**load_file(request["io"])).logits
        save_file({"logits": logits.contiguous()}, request["io"])
        print("ok", flush=True)
    except Exception:
        print(json.dumps(traceback.format_exc()), flush=True)
"""


@pytest.fixture(scope="module")
def reloader():
    process = subprocess.Popen(
        [sys.executable, "-c", RELOAD_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    def reload(base_dir: Path, output_dir: Path, inputs: dict, io: Path) -> torch.Tensor:
        save_file({k: v.contiguous() for k, v in inputs.items()}, io)
        request = {"base_dir": str(base_dir), "output_dir": str(output_dir), "io": str(io)}
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        answer = process.stdout.readline().strip()
        assert answer == "ok", json.loads(answer) if answer else "the reload process died"
        return load_file(io)["logits"]

    yield reload
    process.stdin.close()
    process.wait(timeout=30)


def _expected_trainable(
    case: str, task: str, original: dict[str, torch.Tensor], model
) -> int | None:
    """The trainable count each method promises, from the pretrained model's shapes; None
    where the method's own bookkeeping (peft's) is the only definition."""
    method_type = CASES[case][0]["type"]
    params = _named_parameters(model)
    head = sum(p.numel() for n, p in params.items() if n.startswith("classifier."))
    body = {n: p for n, p in original.items() if n in params}  # e.g. BERT's unused pooler
    if method_type == "full":
        return sum(p.numel() for p in body.values()) + head
    if method_type == "head_only":
        return head
    if method_type == "bitfit":
        return sum(p.numel() for n, p in body.items() if n.endswith(".bias")) + head
    if method_type == "layerwise_unfreeze":
        return sum(p.numel() for n, p in body.items() if ".layer." in n or ".layers." in n) + head
    if method_type == "bottleneck_adapter":
        b = CASES[case][0]["bottleneck"]
        hidden = 32
        layers = 2
        return layers * 2 * (2 * hidden * b + b + hidden) + head
    if method_type == "lora" and CASES[case][0].get("use_dora") is None:
        r = CASES[case][0]["r"]
        total = 0
        for n, p in body.items():
            is_linear_weight = n.endswith(".weight") and p.ndim == 2 and "embed" not in n
            if is_linear_weight and "lm_head" not in n and "embeddings" not in n:
                out_features, in_features = p.shape
                total += r * (in_features + out_features)
        return total + head
    return None


@pytest.mark.parametrize(("case", "task"), TABLE, ids=[f"{c}-{t}" for c, t in TABLE])
def test_method_task_pair_trains_only_its_parameters_and_reloads(
    case, task, tmp_path, registry, cache_dir, reloader
):
    spec = _spec(case, task)
    plain_task = spec["task"]
    original = _original_weights(spec, registry)
    result = train(
        spec, tmp_path / "run", data=_data(tmp_path, task), registry=registry, cache_dir=cache_dir
    )
    assert result.status == "succeeded"
    out = result.output_dir
    report = json.loads((out / "result.json").read_text())
    metrics = report["metrics"]
    assert metrics["best"]["eval_loss"] < metrics["initial"]["eval_loss"], metrics

    model = result.model.eval()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    expected = _expected_trainable(case, plain_task, original, model)
    if expected is not None:
        assert trainable == expected, (trainable, expected)
    else:
        assert 0 < trainable < 0.5 * total, (trainable, total)

    # only the intended parameters moved
    current = {n: p.detach() for n, p in _named_parameters(model).items()}
    if (out / "adapter_config.json").is_file():
        if case not in MUTATES_BASE:
            kept = {n: w for n, w in original.items() if n in current}
            moved = [n for n, w in kept.items() if not torch.equal(current[n], w)]
            assert moved == [], moved[:5]
            assert len(kept) >= len(original) - 2  # all but an unused pooler
    else:
        saved = load_file(out / TRAINED_WEIGHTS_FILE)
        frozen = {n: w for n, w in original.items() if n not in saved and n in current}
        assert all(torch.equal(current[n], w) for n, w in frozen.items())
        # each saved tensor is new (an adapter, the head) or moved away from the pretrained
        assert any(n not in original or not torch.equal(t, original[n]) for n, t in saved.items())
        assert sum(t.numel() for t in saved.values()) == trainable

    # the output reloads in a fresh process (peft's loader for adapters) with the same outputs
    if plain_task == "causal_lm":
        inputs = {"input_ids": torch.tensor([[1, 5, 9, 13, 2, 7]])}
    else:
        tokenizer = result_tokenizer(out)
        text = "the film was great" if plain_task == "seq_classification" else "alice visited rome"
        encoded = tokenizer([text, "bob saw paris and carol"], padding=True, return_tensors="pt")
        inputs = dict(encoded)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
    base_dir = registry.get(spec["model"]).source.path
    reloaded = reloader(base_dir, out, inputs, tmp_path / "io.safetensors")
    torch.testing.assert_close(reloaded, expected_logits, atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    assert "load_trained" in card or "PeftModel.from_pretrained" in card
    head_rate = report["spec"]["hyperparameters"]["head_learning_rate"]
    if plain_task != "causal_lm" and spec["method"]["type"] != "head_only":
        assert head_rate and f"(the new head {head_rate:g})" in card  # the head's own rate
    else:
        assert head_rate is None
    if plain_task != "causal_lm":
        info = json.loads((out / "tuneq_model.json").read_text())
        assert info["task"] == plain_task and info["id2label"]["0"] == report["labels"][0]


def result_tokenizer(out: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out)


@pytest.mark.parametrize(
    "case", ["lora", "adalora", "prompt_tuning", "prefix_tuning", "lora-pissa"]
)
def test_causal_adapters_load_with_nothing_but_peft(
    case, tmp_path, registry, cache_dir, tiny_model_dir
):
    spec = _spec(case, "causal_lm")
    result = train(
        spec,
        tmp_path / "run",
        data=_data(tmp_path, "causal_lm"),
        registry=registry,
        cache_dir=cache_dir,
    )
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    model = result.model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    reloaded = logits_from_plain_peft(tiny_model_dir, result.output_dir, ids, scratch)
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("case", "where", "match", "param"),
    [
        (
            "bitfit",
            "seq_classification@llama",
            "does not support model family 'llama'",
            "method.type",
        ),
        ("lora-pissa", "seq_classification", "available for causal_lm only", "method.init"),
        ("head_only", "causal_lm", "does not support task 'causal_lm'", "method.type"),
    ],
)
def test_unsupported_pairs_are_refused_before_any_weight_loads(
    case, where, match, param, tmp_path, registry, cache_dir
):
    with pytest.raises(SpecError, match=match) as caught:
        train(
            _spec(case, where),
            tmp_path,
            data=_data(tmp_path, where),
            registry=registry,
            cache_dir=cache_dir,
        )
    assert caught.value.param == param


# ---------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------

RESUME = sorted(c for c, t in TABLE if t == "causal_lm") + [
    ("adalora", "seq_classification"),
    ("layerwise-bottom-up-plateau", "seq_classification"),
    ("prefix_tuning", "seq_classification"),
    ("head_only", "token_classification"),
    ("lora", "token_classification"),
]
RESUME = [(c, "causal_lm") if isinstance(c, str) else c for c in RESUME]


@pytest.mark.parametrize(("case", "task"), RESUME, ids=[f"{c}-{t}" for c, t in RESUME])
def test_method_resumes_exactly(case, task, tmp_path, registry, cache_dir):
    data = _data(tmp_path, task)

    def run(workdir, hooks=None, **kw):
        return train(
            _spec(case, task),
            workdir,
            hooks,
            data=data,
            registry=registry,
            cache_dir=cache_dir,
            **kw,
        )

    whole = run(tmp_path / "whole")
    assert run(tmp_path / "split", stop_after(8)).status == "stopped"
    resumed = run(tmp_path / "split", resume_from=tmp_path / "split/checkpoints/checkpoint-6")

    def losses(workdir):
        rows = (workdir / "metrics.jsonl").read_text().splitlines()
        return {
            r["step"]: (r.get("train_loss"), r.get("learning_rate"), r.get("eval_loss"))
            for r in map(json.loads, rows)
        }

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(got) == sorted(expected)
    for step in expected:
        for a, b in zip(got[step], expected[step], strict=True):
            assert (a is None and b is None) or abs(a - b) <= 1e-5, (
                case,
                step,
                got[step],
                expected[step],
            )
    assert resumed.result["trained_tokens"] == whole.result["trained_tokens"]
    assert resumed.result["report"] == whole.result["report"] or task == "causal_lm"
