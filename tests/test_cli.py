"""The CLI: a real run, and every bad input answered by exit 2 and one line naming the fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peft_engine.cli import main
from tests.conftest import ROOT, chat, write_jsonl

GOOD_ROWS = [chat(f"Say {i}.", f"{i}.") for i in range(12)]


@pytest.fixture
def files(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"model": "tiny-llama", "hyperparameters": {"max_steps": 2, "batch_size": 2}})
    )
    return spec, write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)


def _cli(args, registry, capsys):
    """Exit code, stdout, and the last line of stderr (progress lines may come before)."""
    code = main(["--registry", str(registry), *map(str, args)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, (captured.err.strip().splitlines() or [""])[-1]


def _write_spec(tmp_path, spec) -> str:
    path = tmp_path / "bad-spec.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    return str(path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"model": "tiny-llama", "learning_rat": 0.1}, "learning_rat: unknown field"),
        (
            {"model": "tiny-llama", "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs: Input should be greater than or equal to 1",
        ),
        (
            {"model": "tiny-llama", "method": {"type": "lora", "r": 0}},
            "method.r: Input should be greater than or equal to 1",
        ),
        (
            {"model": "tiny-llama", "hyperparameters": {"batch_size": "big"}},
            "hyperparameters.batch_size: Input should be a valid integer",
        ),
        (
            {"model": "tiny-llama", "hyperparameters": {"packing": "yes please"}},
            "hyperparameters.packing: Input should be a valid boolean",
        ),
        ({"model": "gpt-17"}, "model: model 'gpt-17' is not in this deployment's registry"),
        (
            {"model": "tiny-llama", "hyperparameters": {"max_seq_length": 4096}},
            "hyperparameters.max_seq_length: 4096 exceeds the model's context of 512 tokens",
        ),
        ('{"model": ', "spec: "),
    ],
)
def test_bad_spec_exits_2_naming_the_field(
    tmp_path, files, tiny_registry_file, capsys, spec, expected
):
    _, data = files
    code, out, err = _cli(
        ["train", _write_spec(tmp_path, spec), "--data", data, "--out", tmp_path / "out"],
        tiny_registry_file,
        capsys,
    )
    assert code == 2
    assert err.startswith("error: ") and expected in err
    assert not (tmp_path / "out" / "output").exists()


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], "training_file: train.jsonl has no examples (the file is empty)"),
        (
            [chat("a", "b"), '{"messages": [', chat("c", "d")],
            "training_file: 1 invalid line in train.jsonl: line 2: not valid JSON",
        ),
        (
            [chat("a", "b"), {"messages": [{"role": "user", "content": "hi"}]}],
            "line 2, messages: the conversation has no assistant message",
        ),
        (
            [
                {
                    "messages": [
                        {"role": "user", "content": ["hi"]},
                        {"role": "assistant", "content": "x"},
                    ]
                }
            ],
            "line 1, messages[0].content: expected a string, found a list",
        ),
        ([{"prompt": "p", "completion": 7}], "line 1, completion: expected a string"),
    ],
)
def test_bad_data_exits_2_naming_the_line(
    tmp_path, files, tiny_registry_file, capsys, rows, expected
):
    spec, _ = files
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    code, out, err = _cli(
        ["train", spec, "--data", data, "--out", tmp_path / "out"], tiny_registry_file, capsys
    )
    assert code == 2
    assert err.startswith("error: ") and expected in err


def test_bad_validation_file_is_named(tmp_path, files, tiny_registry_file, capsys):
    spec, data = files
    bad = write_jsonl(tmp_path / "val.jsonl", ["not json"])
    code, _, err = _cli(
        ["train", spec, "--data", data, "--validation", bad, "--out", tmp_path / "out"],
        tiny_registry_file,
        capsys,
    )
    assert code == 2 and err.startswith("error: validation_file: ") and "line 1" in err


def test_models_lists_the_registry(tiny_registry_file, capsys):
    code, out, _ = _cli(["models"], tiny_registry_file, capsys)
    assert code == 0
    for name in ("smollm2-135m-instruct", "all-minilm-l6-v2", "tiny-llama"):
        assert name in out


def test_train_in_a_subprocess_prints_progress_and_a_summary(tmp_path, files, tiny_registry_file):
    spec, data = files
    run = _engine_subprocess(spec, data, tmp_path / "out", tiny_registry_file)
    assert run.returncode == 0, run.stderr
    assert "step 2/2 loss" in run.stderr  # plain log lines when not on a terminal
    assert "eval (base model)" in run.stderr
    assert f"output: {tmp_path / 'out' / 'output'}" in run.stdout
    assert "eval loss:" in run.stdout
    assert (tmp_path / "out" / "output" / "adapter_model.safetensors").is_file()


def test_user_error_in_a_subprocess_has_no_traceback(tmp_path, tiny_registry_file):
    spec = _write_spec(tmp_path, {"model": "nope"})
    data = write_jsonl(tmp_path / "train.jsonl", GOOD_ROWS)
    run = _engine_subprocess(spec, data, tmp_path / "out", tiny_registry_file)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: model: model 'nope'")


def _engine_subprocess(spec, data, out, registry_file) -> subprocess.CompletedProcess:
    """`python -m peft_engine train` as a user runs it, the registry given by environment."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "peft_engine",
            "train",
            str(spec),
            "--data",
            str(data),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TUNEQ_MODEL_REGISTRY": str(registry_file)},
        cwd=ROOT,
        timeout=300,
    )
