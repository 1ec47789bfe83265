"""What per-example diagnostics cost a training step: the causal-LM step with and without
the per-example losses, side by side in one process.

    .venv/bin/python bench/diagnostics_overhead.py             # SmolLM2-135M's shape on a GPU
    .venv/bin/python bench/diagnostics_overhead.py --layers 30 --examples 8 --length 256

A random Llama with SmolLM2-135M-Instruct's shape (hidden 576, 9 heads / 3 KV heads,
vocabulary 49,152) from its config, no download; a micro-batch of `--examples` random
examples of `--length` tokens each, every token a target. On a GPU the defaults are the
whole model (30 layers) and 8 x 512 tokens; on a CPU 2 layers and 4 x 128 tokens, so that
it ends in minutes (the output layer, where the per-example sums happen, is full size). One step is
forward, loss and backward, as the training loop does it: with diagnostics, the loss also
returns each example's summed loss (the fused loss writes each row's loss, then a segment
sum over the examples) and the step records them in a `TrainLossTracker` (one `.tolist()`
and a dict update per example); without, the plain summed loss. Both variants run
alternately, `--repeats` times each after a warm-up, packed and padded, fused and plain
head; the table gives the median seconds and the ratio with / without.

Classification and token classification are not measured: their per-example losses are
the same cross-entropy with `reduction="none"` summed afterwards, the same operations.
The last line is one JSON object with the figures. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from peft_engine.data.batching import pack, pad
from peft_engine.data.tokenize import TokenizedExample
from peft_engine.diagnostics import TrainLossTracker
from peft_engine.loss import batch_loss
from peft_engine.models.attention import use_packed_attention


def main() -> None:
    args = _parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    gpu = device.type == "cuda"
    args.layers = args.layers or (30 if gpu else 2)
    args.examples = args.examples or (8 if gpu else 4)
    args.length = args.length or (512 if gpu else 128)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49_152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).to(device)
    use_packed_attention(model)
    examples = [_random_example(line, args.length) for line in range(1, args.examples + 1)]
    rows = []
    for packing in (True, False):
        batch = (pack(examples) if packing else pad(examples, 0)).to(device)
        for fused in (True, False):
            seconds = _time_variants(model, batch, fused, args.repeats, device)
            without, with_ = (statistics.median(seconds[v]) for v in (False, True))
            row = {"packing": packing, "fused": fused, "without_seconds": without,
                   "with_seconds": with_, "ratio": with_ / without}  # fmt: skip
            rows.append(row)
            if len(rows) == 1:
                print(f"{'layout':8} {'head':6} {'without s':>10} {'with s':>10} {'ratio':>7}")
            layout, head = "packed" if packing else "padded", "fused" if fused else "plain"
            print(f"{layout:8} {head:6} {without:10.4f} {with_:10.4f} {with_ / without:7.3f}",
                  flush=True)  # fmt: skip
    print(json.dumps({"device": str(device), "layers": args.layers, "examples": args.examples,
                      "length": args.length, "rows": rows}))  # fmt: skip


def _random_example(line: int, length: int) -> TokenizedExample:
    ids = torch.randint(0, 49_152, (length,)).tolist()
    return TokenizedExample(line, ids, [*ids[1:], -100], False)


def _time_variants(
    model: Any, batch: Any, fused: bool, repeats: int, device: torch.device
) -> dict[bool, list[float]]:
    """Seconds of a step with and without per-example losses, run alternately."""
    seconds: dict[bool, list[float]] = {False: [], True: []}
    tracker = TrainLossTracker()
    for i in range(repeats + 1):  # the first round warms up and is not counted
        for per_example in (False, True):
            model.zero_grad(set_to_none=True)
            _sync(device)
            started = time.perf_counter()
            result = batch_loss(model, batch, fused=fused, per_example=per_example)
            (result.loss / batch.n_loss_tokens).backward()
            float(result.loss.detach())  # the loop reads the loss each micro-batch
            tracker.record(result.examples)
            _sync(device)
            if i:
                seconds[per_example].append(time.perf_counter() - started)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, help="default 30 on a GPU, 2 on a CPU")
    parser.add_argument("--examples", type=int, help="default 8 on a GPU, 4 on a CPU")
    parser.add_argument("--length", type=int, help="default 512 on a GPU, 128 on a CPU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="on the CPU even with a GPU")
    return parser.parse_args()


if __name__ == "__main__":
    main()
