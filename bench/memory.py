"""The memory estimate (peft_engine/memory.py) against the peak memory a training run takes.

    .venv/bin/python bench/memory.py            # the README's table
    .venv/bin/python bench/memory.py --quick    # the small shapes only

Each case trains two optimizer steps of `peft_engine.train` (fp32, on the CPU: the mode
"auto" picks there) in a fresh process, on a model with random weights in a temporary
directory: tiny Llamas of two widths, and one with SmolLM2-135M's exact shape (30 layers,
576 wide, vocabulary 49,152, tied embeddings). Each step is one forward pass of exactly
`tokens` tokens (batch x max_seq_length, packed).

Measured: the process's resident memory, from /proc/self/status, twice per case, each in
its own process: "live" with glibc's mmap threshold fixed at 64 KiB
(MALLOC_MMAP_THRESHOLD_), so that every tensor over 64 KiB is mapped on its own and unmapped
when freed and the peak RSS follows the peak of live tensor bytes; "RSS" with glibc's
defaults, whose heap keeps freed blocks and fragments, which is what the machine charges
(the estimate does not model a CPU allocator's slack, nor a GPU caching allocator's). The
baseline is VmRSS after the imports and a small warm-up step (thread pools, kernels), with
the high-water mark then reset (`echo 5 > /proc/self/clear_refs`). The peak is the highest
VmHWM read in the hooks after step 1 and after step 2, less the baseline (model loading,
optimizer state and both steps included; the output written afterwards is not).
"activations" measured is step 2's own growth: VmHWM during it less VmRSS before it (after
`malloc_trim`): the activations and, for full fine-tuning, the gradients that step
allocates (the estimate counts gradients in the trained state instead); "weights+state"
measured is VmRSS before step 2 less the baseline (weights, optimizer state, the data).

The estimate is `estimate_memory` on the model directory's safetensors headers with the
same method, tokens, precision and checkpointing. error = (estimate - measured) / measured.
Nothing is asserted; the last line is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# name -> LlamaConfig fields (SmolLM2-135M's shape is its config.json's)
SHAPES: dict[str, dict[str, Any]] = {
    "llama-w256-l4": {
        "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 8192,
    },
    "llama-w512-l4": {
        "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 16384,
    },
    "smollm2-135m-shape": {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
}  # fmt: skip
# (shape, method, batch, max_seq_length, gradient checkpointing)
CASES = [
    ("llama-w256-l4", "lora", 4, 128, False),
    ("llama-w256-l4", "lora", 8, 256, False),
    ("llama-w512-l4", "lora", 4, 256, False),
    ("llama-w512-l4", "lora", 4, 256, True),
    ("llama-w512-l4", "full", 4, 256, False),
    ("llama-w512-l4", "full", 4, 256, True),
    ("smollm2-135m-shape", "lora", 4, 128, False),
    ("smollm2-135m-shape", "lora", 4, 128, True),
    ("smollm2-135m-shape", "full", 4, 128, False),
]
QUICK = {"llama-w256-l4", "llama-w512-l4"}
WORDS = 2000  # the word-level tokenizer's vocabulary: one token a word
MMAP_THRESHOLD = 65536  # "live": every block over 64 KiB mapped alone, unmapped when freed


def main() -> None:
    args = _parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return
    cases = [c for c in CASES if not args.quick or c[0] in QUICK]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneq-memory-") as tmp:
        registry = _write_models(Path(tmp), sorted({c[0] for c in cases}))
        for shape, method, batch, length, checkpointing in cases:
            case = {
                "shape": shape, "method": method, "batch": batch, "length": length,
                "checkpointing": checkpointing, "registry": str(registry),
                "work": tmp,
            }  # fmt: skip
            live = _run_child(case, {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
            rss = _run_child(case, {})
            rows.append(case | live | {"rss": rss})
            _print_row(rows[-1], header=len(rows) == 1)
    for measure, error in (("live", lambda r: r["error"]), ("RSS", lambda r: r["rss"]["error"])):
        errors = [abs(error(r)) for r in rows]
        print(
            f"against {measure}: largest |error| {max(errors):.0%}, "
            f"mean |error| {sum(errors) / len(errors):.0%}"
        )
    print(json.dumps(rows))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the two tiny Llamas only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def _write_models(tmp: Path, shapes: list[str]) -> Path:
    """Each shape as a random-weight Llama with a word-level tokenizer; their registry."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i + 3 for i in range(WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="</s>", bos_token="<s>", pad_token="<pad>"
    )
    entries = {}
    for name in shapes:
        torch.manual_seed(0)
        config = LlamaConfig(**SHAPES[name], max_position_embeddings=2048,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
        directory = tmp / name
        LlamaForCausalLM(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        entries[name] = {
            "source": {"type": "local", "path": str(directory)},
            "tasks": ["causal_lm"],
        }
    registry = tmp / "models.json"
    registry.write_text(json.dumps({"models": entries}))
    return registry


def _run_child(case: dict[str, Any], malloc: dict[str, str]) -> dict[str, Any]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | malloc
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(case)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise RuntimeError(f"case {case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def _child(case: dict[str, Any]) -> dict[str, Any]:
    """Train two steps of the case in this process; the measured and estimated figures."""
    import peft_engine.training as training
    from peft_engine.hooks import Hooks
    from peft_engine.memory import estimate_memory, read_model_shape
    from peft_engine.models import load_registry
    from peft_engine.prepare import DataPaths
    from peft_engine.spec import parse_spec

    _warm_up()
    work = Path(tempfile.mkdtemp(dir=case["work"]))
    data = work / "train.jsonl"
    text = " ".join(f"w{i % WORDS}" for i in range(case["length"] + 8))  # cut to length
    data.write_text((json.dumps({"text": text}) + "\n") * (2 * case["batch"]))
    spec = parse_spec({
        "model": case["shape"], "validation_split": 0.0,
        "method": {"type": case["method"]},
        "hyperparameters": {
            "n_epochs": 1, "batch_size": case["batch"], "max_seq_length": case["length"],
            "learning_rate": 1e-4, "precision": "fp32", "checkpoint_every_steps": 1000,
            "gradient_checkpointing": case["checkpointing"],
        },
    })  # fmt: skip
    tokens = case["batch"] * case["length"]
    probe = _Probe()
    result = training.train(
        spec,
        work / "out",
        Hooks(on_metrics=probe.on_metrics),
        data=DataPaths(data),
        registry=load_registry(Path(case["registry"])),
        cache_dir=work / "cache",
        tokens_per_forward=tokens,
    )
    registry = load_registry(Path(case["registry"]))
    shape = read_model_shape(registry.get(case["shape"]).source.path)
    assert shape is not None
    estimate = estimate_memory(
        shape, spec.method, tokens=tokens, precision="fp32", checkpointing=case["checkpointing"]
    )
    measured = max(probe.peaks) - probe.baseline
    return {
        "tokens": tokens,
        "checkpointing_active": _checkpointing_active(result.model),
        "estimate": estimate.as_dict(),
        "measured_peak_bytes": measured,
        "measured_step_bytes": probe.peaks[1] - probe.before_step_2,
        "measured_before_step_bytes": probe.before_step_2 - probe.baseline,
        "error": (estimate.peak_bytes - measured) / measured,
    }


class _Probe:
    """Reads the process's memory in the step hooks (see the module docstring)."""

    def __init__(self) -> None:
        _trim()
        self.baseline = _status("VmRSS")
        _reset_peak()
        self.peaks: list[int] = []
        self.before_step_2 = 0

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train_loss" not in metrics or len(self.peaks) >= 2:
            return
        self.peaks.append(_status("VmHWM"))
        if len(self.peaks) == 1:  # before step 2: what step 1 freed given back, peak reset
            _trim()
            self.before_step_2 = _status("VmRSS")
            _reset_peak()


def _warm_up() -> None:
    """A small forward and backward, so that thread pools and kernels exist before the
    baseline is read."""
    import torch

    layer = torch.nn.Linear(64, 64)
    layer(torch.randn(32, 64)).square().sum().backward()


def _checkpointing_active(model: Any) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _status(field: str) -> int:
    """A VmRSS/VmHWM line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _print_row(row: dict[str, Any], *, header: bool) -> None:
    """MiB, estimated / live / RSS: weights and trained state (measured: before step 2),
    activations (measured: step 2's growth), the peak; and the peak's errors."""
    if header:
        print(
            f"{'shape':<19} {'method':<6} {'tokens':>6} {'ckpt':<4} {'weights+state':>15} "
            f"{'activations':>15} {'peak':>15} {'error':>6} {'(RSS)':>6}"
            "   MiB: estimated/live/RSS"
        )
    est, rss = row["estimate"], row["rss"]
    on = row["checkpointing_active"] and rss["checkpointing_active"]
    ckpt = ("on" if on else "OFF!") if row["checkpointing"] else "off"
    triples = [
        (
            est["weights_bytes"] + est["trained_state_bytes"],
            row["measured_before_step_bytes"],
            rss["measured_before_step_bytes"],
        ),
        (est["activations_bytes"], row["measured_step_bytes"], rss["measured_step_bytes"]),
        (est["peak_bytes"], row["measured_peak_bytes"], rss["measured_peak_bytes"]),
    ]
    cells = " ".join(f"{'/'.join(f'{v / MIB:.0f}' for v in t):>15}" for t in triples)
    print(
        f"{row['shape']:<19} {row['method']:<6} {row['tokens']:>6} {ckpt:<4} {cells} "
        f"{row['error']:>+6.0%} {rss['error']:>+6.0%}",
        flush=True,
    )


if __name__ == "__main__":
    main()
