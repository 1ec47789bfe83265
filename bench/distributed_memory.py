"""Memory on each rank of a job on two ranks (resources.gpus) against one process, on the CPU.

    .venv/bin/python bench/distributed_memory.py            # the README's table
    .venv/bin/python bench/distributed_memory.py --quick    # a small shape only

What `resources.gpus: 2` buys in memory: data parallel (adapters) keeps the whole model on
every rank, FSDP (full fine-tuning) splits the weights, gradients and AdamW's state. Each
case trains two optimizer steps of `peft_engine.train` in fp32 with gloo, on a random
model of SmolLM2-135M's exact shape (bench/memory.py's models), batch 4 of 128 tokens (a
rank's share: 2 sequences), once in one process and once on two ranks under torchrun.

Measured in each process as bench/memory.py does ("live": glibc's mmap threshold at 64 KiB,
so the resident size follows the live tensors): the baseline is VmRSS after the imports and
a warm-up, `load+step 1` is the highest VmHWM up to the end of step 1 (the base model loads
whole on every rank before FSDP shards it), `step 2` is the high-water mark of step 2 alone,
both less the baseline. The estimate is peft_engine/memory.py's for each rank (`per_rank`).
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
sys.path.insert(0, str(ROOT / "bench"))
import memory as bench_memory  # noqa: E402 - bench/memory.py: its models and probes

MIB = 2**20
LIVE = {"MALLOC_MMAP_THRESHOLD_": "65536"}
CASES = [("smollm2-135m-shape", "full"), ("smollm2-135m-shape", "lora")]
QUICK = [("llama-w256-l4", "full"), ("llama-w256-l4", "lora")]
BATCH, LENGTH = 4, 128


def main() -> None:
    args = _parse_args()
    if args.rank_child:
        _rank_child(json.loads(args.rank_child))
        return
    cases = QUICK if args.quick else CASES
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneq-dist-memory-") as tmp:
        registry = bench_memory._write_models(Path(tmp), sorted({s for s, _ in cases}))
        for shape, method in cases:
            for ranks in (1, 2):
                case = {"shape": shape, "method": method, "ranks": ranks,
                        "registry": str(registry), "work": tmp}  # fmt: skip
                for rank in _run(case):
                    rows.append(rank)
                    _print_row(rank, header=len(rows) == 1)
    print(json.dumps(rows))


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape only")
    parser.add_argument("--rank-child", help=argparse.SUPPRESS)
    return parser.parse_args()


def _run(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The case in fresh processes (torchrun for two ranks); each rank's figures."""
    out = Path(tempfile.mkdtemp(dir=case["work"]))
    case = case | {"out": str(out)}
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | LIVE
    child = [__file__, "--rank-child", json.dumps(case)]
    if case["ranks"] == 1:
        command = [sys.executable, *child]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={case['ranks']}", *child]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))]


def _rank_child(case: dict[str, Any]) -> None:
    """Two steps on this rank; its figures to OUT/rank-N.json."""
    from peft_engine.distributed import close, world_from_env
    from peft_engine.hooks import Hooks
    from peft_engine.memory import estimate_memory, forward_tokens, per_rank, read_model_shape
    from peft_engine.models import load_registry
    from peft_engine.prepare import DataPaths
    from peft_engine.spec import parse_spec
    from peft_engine.training import train

    world = world_from_env()
    bench_memory._warm_up()
    work = Path(case["out"])
    data = work / "train.jsonl"
    text = " ".join(f"w{i % bench_memory.WORDS}" for i in range(LENGTH + 8))
    if world.is_main:
        data.write_text((json.dumps({"text": text}) + "\n") * (2 * BATCH))
    spec = parse_spec({
        "model": case["shape"], "validation_split": 0.0, "method": {"type": case["method"]},
        "resources": {"gpus": case["ranks"]},
        "hyperparameters": {"n_epochs": 1, "batch_size": BATCH, "max_seq_length": LENGTH,
                            "learning_rate": 1e-4, "precision": "fp32",
                            "checkpoint_every_steps": 1000},
    })  # fmt: skip
    registry = load_registry(Path(case["registry"]))
    if world.active:
        world.any_(False)  # rank 0 has written the data
    probe = bench_memory._Probe()
    train(spec, work / "run", Hooks(on_metrics=probe.on_metrics), data=DataPaths(data),
          registry=registry, cache_dir=work / "cache", world=world)  # fmt: skip
    shape = read_model_shape(registry.get(case["shape"]).source.path)
    tokens = forward_tokens(batch_size=-(-BATCH // case["ranks"]), sequence_tokens=LENGTH,
                            budget=512)  # fmt: skip
    estimate = per_rank(
        estimate_memory(shape, spec.method, tokens=tokens, precision="fp32", checkpointing=False),
        shape, case["ranks"], sharded=case["method"] == "full",
    )  # fmt: skip
    figures = {
        "shape": case["shape"], "method": case["method"], "ranks": case["ranks"],
        "rank": world.rank, "estimate_peak_bytes": estimate.peak_bytes,
        "load_and_step_1_bytes": probe.peaks[0] - probe.baseline,
        "step_2_bytes": probe.peaks[1] - probe.baseline,
        "before_step_2_bytes": probe.before_step_2 - probe.baseline,
    }  # fmt: skip
    (work / f"rank-{world.rank}.json").write_text(json.dumps(figures))
    close(world)


def _print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print("| shape | method | ranks | rank | estimate MiB | load+step 1 MiB | "
              "before step 2 MiB | step 2 MiB |")  # fmt: skip
        print("|---|---|---:|---:|---:|---:|---:|---:|")
    mib = {k: f"{row[k] / MIB:.0f}" for k in row if k.endswith("_bytes")}
    cells = [row["shape"], row["method"], row["ranks"], row["rank"]] + [
        mib[k] for k in ("estimate_peak_bytes", "load_and_step_1_bytes", "before_step_2_bytes",
                         "step_2_bytes")
    ]  # fmt: skip
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


if __name__ == "__main__":
    main()
