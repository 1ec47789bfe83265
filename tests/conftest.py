"""Shared fixtures: a tiny random Llama with a real chat template, and a registry naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Nothing here downloads from the Hugging Face Hub (models come from the registry, on disk):
# bitsandbytes' import would otherwise ask the Hub for a CPU kernel, in every process that
# imports peft (the test processes, their workers and ranks inherit this).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = ROOT.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The files that take longest, longest first (their share of a full run on 2 cores).
# `make test` deals whole files to its pytest-xdist workers in collection order, so these
# start first and the many short files fill in behind them; otherwise the demo, started
# last, would run alone at the end. Only the order matters: a file missing here runs after.
LONGEST_FIRST = (
    "test_demo.py",
    "test_e2e.py",
    "test_e2e_images.py",
    "test_real_data_classification.py",
    "test_smollm2_dolly.py",
    "test_faults.py",
    "test_methods.py",
    "test_openapi_contract.py",
    "test_dashboard_browser.py",
    "test_user_cli.py",
    "test_webhooks_e2e.py",
    "test_models_registry.py",
    "test_generate.py",
    "test_event_stream_e2e.py",
    "test_fair_share.py",
    "test_export.py",
    "test_distributed.py",
    "test_tracking.py",
    "test_export_e2e.py",
    "test_qlora.py",
    "test_worker_metrics.py",
    "test_distributed_worker.py",
    "test_store_faults.py",
    "test_eval_budget.py",
    "test_image_model.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first; a stable sort keeps each file's own order and the others'."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Hello! How are you today? I am fine, thank you.",
    "Write a haiku about autumn leaves falling slowly to the ground.",
    "system user assistant tool: you are a helpful test assistant",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ' \" ? !",
]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


def build_tiny_llama(
    directory: Path, *, vocab_size: int, tied: bool = False, seed: int = 0
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=1,
        tie_word_embeddings=tied,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


# The tiny BERT's vocabulary (plus single letters): what its test sentences are made of.
WORDS = [  # fmt: skip
    "the",
    "a",
    "film",
    "movie",
    "plot",
    "was",
    "is",
    "great",
    "good",
    "awful",
    "bad",
    "dull",
    "fine",
    "okay",
    "alice",
    "bob",
    "carol",
    "dave",
    "paris",
    "rome",
    "berlin",
    "oslo",
    "met",
    "in",
    "visited",
    "and",
    "saw",
]


def build_tiny_bert(directory: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [*specials, *WORDS, *letters, *(f"##{c}" for c in letters)]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_tokenizer.save_pretrained(directory)
    return build_tiny_llama(directory, vocab_size=len(tiny_tokenizer))


def local_model(directory: Path, family: str, tasks: list[str]) -> dict:
    """A model registry entry for a model in a local directory."""
    return {"source": {"type": "local", "path": str(directory)}, "family": family, "tasks": tasks}


def write_registry(path: Path, models: dict[str, dict]) -> Path:
    """A registry file naming `models` (name -> entry)."""
    path.write_text(json.dumps({"models": models}))
    return path


@pytest.fixture(scope="session")
def tiny_registry_file(tmp_path_factory, tiny_model_dir) -> Path:
    path = tmp_path_factory.mktemp("registry") / "models.json"
    path.write_text(
        json.dumps(
            {
                "models": {
                    "tiny-llama": {
                        "source": {"type": "local", "path": str(tiny_model_dir)},
                        "description": "tiny random Llama for tests",
                        "tasks": ["causal_lm"],
                    }
                }
            }
        )
    )
    return path


@pytest.fixture(scope="session")
def tiny_registry(tiny_registry_file):
    from peft_engine.models import load_registry

    return load_registry(tiny_registry_file)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Where converted base models are cached: shared across runs when TUNEQ_CACHE_DIR is set."""
    configured = os.environ.get("TUNEQ_CACHE_DIR")
    return Path(configured) if configured else tmp_path_factory.mktemp("cache")


@pytest.fixture
def sqlite_settings(tmp_path: Path):
    """Embedded settings under tmp_path, with the database migrated."""
    from tests.service_fixtures import make_settings, migrate

    settings = make_settings(tmp_path)
    migrate(settings)
    return settings


@pytest.fixture
def postgres_settings(tmp_path: Path):
    """Embedded settings under tmp_path on a fresh PostgreSQL database, migrated."""
    from tests.infra import drop_postgres_database, fresh_postgres_database, postgres_url, require
    from tests.service_fixtures import make_settings, migrate

    url = fresh_postgres_database(require(postgres_url))
    try:
        settings = make_settings(tmp_path, database_url=url)
        migrate(settings)
        yield settings
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="module")
def api(stack):
    """An HTTP client of the module's `stack`, a deployment of real processes (tests/stack.py).

    Modules that run the API in-process define their own `api`, which takes precedence."""
    with stack.client() as client:
        yield client


@pytest.fixture(scope="module")
def worker(stack):
    """A `tuneq worker` process of the module's `stack`, stopped after the module (a test
    may stop it sooner)."""
    import signal

    process = stack.start("worker")
    yield process
    if process.poll() is None:
        stack.kill(process, signal.SIGTERM)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user: str, assistant: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    }


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or a skip naming the missing file."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"missing {path} (real data sets live in ../shared/data beside the repo)")
    return path


LOAD_WITH_PLAIN_PEFT = """
import sys, torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from peft import PeftModel
base_dir, adapter_dir, io = sys.argv[1:]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
with torch.no_grad():
    logits = model.eval()(input_ids=load_file(io)["input_ids"]).logits
save_file({"logits": logits.contiguous()}, io)
"""


def logits_from_plain_peft(base_dir: Path, adapter_dir: Path, input_ids, scratch: Path):
    """Logits of the adapter loaded with nothing but transformers + peft, in a new process."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    io = scratch / "logits-io.safetensors"
    save_file({"input_ids": input_ids}, io)
    subprocess.run(
        [sys.executable, "-c", LOAD_WITH_PLAIN_PEFT, str(base_dir), str(adapter_dir), str(io)],
        check=True,
    )
    return load_file(io)["logits"]
