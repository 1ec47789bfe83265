"""Image-archive uploads: `POST /files` with a zip or a tar.gz image folder, against the
same images inline in a base64 JSONL file of the same size (the other way to send images)
and a chat JSONL file of the same size (the text path, the fastest the service has).

    OMP_NUM_THREADS=1 .venv/bin/python bench/archive_upload.py      # ~20 MB and ~200 MB
    .venv/bin/python bench/archive_upload.py --sizes 2,20           # sizes in MB (10^6 B)

Inputs, written under a temporary folder in $TMPDIR and removed at the end: random-noise
64x64 RGB PNGs (PNG level 0, about 12.4 kB each; a pool of 1,024 distinct images cycled,
each repeat megabytes after the last, beyond gzip's 32 kB window, so nothing compresses)
in an image folder (`<label>/<n>.png`, 4 labels), as a zip (deflated, as `zip` makes it)
and a tar.gz (gzip level 6), both with the same images; a JSONL file of
`{"image": "<base64>", "label": ...}` lines as large as the zip (so holding about 3/4 of
its images: base64 is 4/3 of the bytes); and valid chat JSONL of the same size.

Each input is measured in fresh processes, one after the other:

- **HTTP** (throughput): the real app in-process, as tests/test_upload_streaming.py runs
  it (`tests.service_fixtures.asgi_client`: a migrated SQLite database and a local store
  under a temporary home), the multipart body streamed from disk in 64 KiB chunks; after a
  warm-up upload of a tiny file of the same kind, the wall time from the first byte to the
  201 response (validation, hashing, spooling, storing and the database row): MB/s and
  images/s.
- **ingest** (memory): `tuneq.files.ingest.ingest_upload(chunks=..., settings=...)`
  directly, the file read in 64 KiB chunks, after the same warm-up: the growth of resident
  memory (VmHWM less VmRSS before, the high-water mark reset through
  /proc/self/clear_refs), then the same ingest again under tracemalloc (its peak: the
  Python heap's working memory, the images' decoding included).

Memory should stay flat from small to large: the table's last lines give peak(large) /
peak(small) beside bytes(large) / bytes(small). The archives' cost is given as their MB/s
and images/s over the base64 JSONL's (and over chat JSONL's). Nothing is asserted; the last
line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.service_fixtures, bench.api_load

MB = 1_000_000
CHUNK = 64 * 1024
SIDE = 64
POOL = 1024
LABELS = ("cat", "dog", "bird", "fish")
WARM_IMAGES = 8
KINDS = ("zip", "tar.gz", "b64.jsonl", "chat.jsonl")
NAMES = {
    "zip": "zip",
    "tar.gz": "tar.gz",
    "b64.jsonl": "base64 JSONL",
    "chat.jsonl": "chat JSONL",
}

# ----------------------------------------------------------------------------- inputs


def noise_pngs(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct RGB PNGs of random pixels (level 0: they would not compress)."""
    from PIL import Image

    rng = random.Random(seed)
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        image = Image.frombytes("RGB", (SIDE, SIDE), rng.randbytes(SIDE * SIDE * 3))
        image.save(buffer, "PNG", compress_level=0)
        pngs.append(buffer.getvalue())
    return pngs


def _members(pool: list[bytes], count: int) -> Iterator[tuple[str, bytes]]:
    for n in range(count):
        yield f"{LABELS[n % len(LABELS)]}/{n}.png", pool[n % len(pool)]


def write_zip(path: Path, pool: list[bytes], count: int) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in _members(pool, count):
            archive.writestr(name, data)


def write_tar_gz(path: Path, pool: list[bytes], count: int) -> None:
    with tarfile.open(path, "w:gz", compresslevel=6) as tar:
        for name, data in _members(pool, count):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_b64_jsonl(path: Path, pool: list[bytes], size: int) -> int:
    """Inline-image lines up to `size` bytes (whole lines); returns the lines written."""
    written = count = 0
    with path.open("wb") as out:
        while True:
            line = {"image": base64.b64encode(pool[count % len(pool)]).decode()}
            line["label"] = LABELS[count % len(LABELS)]
            data = (json.dumps(line) + "\n").encode()
            if count and written + len(data) > size:
                return count
            out.write(data)
            written += len(data)
            count += 1


def build_inputs(work: Path, label: str, size: int, pool: list[bytes]) -> dict[str, Any]:
    """The four inputs of about `size` bytes: {kind: (path, images)}."""
    from bench.api_load import write_chat_jsonl

    per_image = sum(map(len, pool)) / len(pool) + 40  # a zip's headers, about
    count = max(1, round(size / per_image))
    paths = {kind: work / f"{label}.{kind}" for kind in KINDS}
    write_zip(paths["zip"], pool, count)
    write_tar_gz(paths["tar.gz"], pool, count)
    zip_bytes = paths["zip"].stat().st_size
    lines = write_b64_jsonl(paths["b64.jsonl"], pool, zip_bytes)
    write_chat_jsonl(paths["chat.jsonl"], zip_bytes)
    images = {"zip": count, "tar.gz": count, "b64.jsonl": lines, "chat.jsonl": 0}
    return {kind: (paths[kind], images[kind]) for kind in KINDS}


# ----------------------------------------------------------------------------- a case


def file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _memory_mb() -> dict[str, float]:
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def _settle_and_reset_peak() -> float:
    """Collect, give freed memory back, reset VmHWM to VmRSS; the VmRSS then (MB)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux 4.0+)
    return _memory_mb()["VmRSS"]


def run_ingest(path: Path, warm: Path, home: Path) -> dict[str, Any]:
    """ingest_upload on the file: wall seconds and RSS growth, then the tracemalloc peak."""
    from tests.service_fixtures import make_settings
    from tuneq.files.ingest import ingest_upload

    settings = make_settings(home)

    def ingest() -> int:
        with ingest_upload(chunks=file_chunks(path), settings=settings) as upload:
            return upload.examples

    with ingest_upload(chunks=file_chunks(warm), settings=settings):
        pass
    before = _settle_and_reset_peak()
    started = time.perf_counter()
    examples = ingest()
    seconds = time.perf_counter() - started
    growth = _memory_mb()["VmHWM"] - before
    gc.collect()
    tracemalloc.start()
    ingest()
    heap_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "seconds": seconds,
        "examples": examples,
        "rss_growth_mb": growth,
        "heap_peak_mb": heap_peak / MB,
    }


def run_http(path: Path, warm: Path, home: Path) -> dict[str, Any]:
    """POST /files through the real ASGI app, the body streamed from disk in chunks."""
    import anyio

    from tests.service_fixtures import asgi_client, auth, make_settings, migrate, new_team_key

    settings = make_settings(home)
    migrate(settings)
    key = new_team_key(settings, "bench")
    boundary = "tuneq-bench-archives"
    headers = auth(key) | {"content-type": f"multipart/form-data; boundary={boundary}"}

    async def body(source: Path) -> AsyncIterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n'
            f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; "
            f'name="file"; filename="{source.name}"\r\n\r\n'
        ).encode()
        for chunk in file_chunks(source):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    async def main() -> dict[str, Any]:
        async with asgi_client(settings) as client:
            for source in (warm, path):
                started = time.perf_counter()
                response = await client.post("/files", content=body(source), headers=headers)
                seconds = time.perf_counter() - started
                if response.status_code != 201:
                    raise RuntimeError(f"{source.name}: {response.text[:2000]}")
        return {"seconds": seconds, "examples": response.json()["examples"]}

    return anyio.run(main)


def child(mode: str, path: Path, warm: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="home-", dir=path.parent) as home:
        run = run_http if mode == "http" else run_ingest
        print("RESULT " + json.dumps(run(path, warm, Path(home))))


def measure(mode: str, path: Path, warm: Path) -> dict[str, Any]:
    """One case in a fresh process."""
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), str(warm)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} {path.name} failed:\n{done.stdout}\n{done.stderr}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pool = noise_pngs(POOL)
    warm = build_inputs(work, "warm", WARM_IMAGES * len(pool[0]), pool[:WARM_IMAGES])
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for size_mb in args.sizes:
        label = f"{size_mb:g}MB"
        started = time.perf_counter()
        inputs = build_inputs(work, label, int(size_mb * MB), pool)
        print(f"built the {label} inputs in {time.perf_counter() - started:.0f} s", flush=True)
        for kind, (path, images) in inputs.items():
            row: dict[str, Any] = {"mb": path.stat().st_size / MB, "images": images}
            row["http"] = measure("http", path, warm[kind][0])
            row["ingest"] = measure("ingest", path, warm[kind][0])
            expected = images or row["ingest"]["examples"]
            for mode in ("http", "ingest"):
                if row[mode]["examples"] != expected:
                    raise RuntimeError(f"{path.name}: {row[mode]['examples']} examples")
            rows[label, kind] = row
            print(f"  {label} {NAMES[kind]}: done", flush=True)
            path.unlink()
    return report(rows, [f"{s:g}MB" for s in args.sizes])


def report(rows: dict[tuple[str, str], dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Print the table and the ratios; return the JSON line's figures."""
    print(
        "\n| size | input | MB | images | HTTP s | HTTP MB/s | images/s | MB/s vs base64 JSONL "
        "| ingest s | ingest MB/s | heap peak MB | RSS growth MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    figures: dict[str, Any] = {"chunk_bytes": CHUNK, "image": f"{SIDE}x{SIDE} RGB PNG"}
    for row in rows.values():
        row["mb_s"] = row["mb"] / row["http"]["seconds"]
        row["images_s"] = row["images"] / row["http"]["seconds"]
    for (label, kind), row in rows.items():
        http, ingest = row["http"], row["ingest"]
        vs = row["mb_s"] / rows[label, "b64.jsonl"]["mb_s"]
        images_s = f"{row['images_s']:,.0f}" if row["images"] else "-"
        print(
            f"| {label} | {NAMES[kind]} | {row['mb']:.1f} | {row['images']:,} | "
            f"{http['seconds']:.2f} | {row['mb_s']:.1f} | {images_s} | {vs:.2f} | "
            f"{ingest['seconds']:.2f} | {row['mb'] / ingest['seconds']:.1f} | "
            f"{ingest['heap_peak_mb']:.1f} | {ingest['rss_growth_mb']:.1f} |"
        )
        key = f"{label}_{kind.replace('.', '_')}"
        figures[f"{key}_mb"] = round(row["mb"], 2)
        figures[f"{key}_images"] = row["images"]
        figures[f"{key}_http_mb_s"] = round(row["mb_s"], 2)
        figures[f"{key}_http_images_s"] = round(row["images_s"], 1)
        figures[f"{key}_ingest_mb_s"] = round(row["mb"] / ingest["seconds"], 2)
        figures[f"{key}_heap_peak_mb"] = round(ingest["heap_peak_mb"], 2)
        figures[f"{key}_rss_growth_mb"] = round(ingest["rss_growth_mb"], 2)
    print_ratios(rows, labels, figures)
    return figures


def print_ratios(
    rows: dict[tuple[str, str], dict[str, Any]], labels: list[str], figures: dict[str, Any]
) -> None:
    """Archives over the JSONL baselines (HTTP MB/s and images/s), and large over small."""
    print()
    for label in labels:
        base, chat = rows[label, "b64.jsonl"], rows[label, "chat.jsonl"]
        for kind in ("zip", "tar.gz"):
            row, key = rows[label, kind], f"{label}_{kind.replace('.', '_')}"
            ratios = {
                "mb_s_vs_b64": row["mb_s"] / base["mb_s"],
                "images_s_vs_b64": row["images_s"] / base["images_s"],
                "mb_s_vs_chat": row["mb_s"] / chat["mb_s"],
            }
            print(
                f"{label} {kind}: MB/s x{ratios['mb_s_vs_b64']:.2f} of base64 JSONL's, "
                f"images/s x{ratios['images_s_vs_b64']:.2f}, MB/s x{ratios['mb_s_vs_chat']:.2f} "
                "of chat JSONL's"
            )
            figures |= {f"{key}_{name}": round(value, 3) for name, value in ratios.items()}
    if len(labels) < 2:
        return
    small, large = labels[0], labels[-1]
    for kind in KINDS:
        a, b = rows[small, kind], rows[large, kind]
        key = kind.replace(".", "_")
        ratios = {
            "bytes": b["mb"] / a["mb"],
            "heap_peak": b["ingest"]["heap_peak_mb"] / a["ingest"]["heap_peak_mb"],
            "rss_growth": b["ingest"]["rss_growth_mb"] / max(a["ingest"]["rss_growth_mb"], 0.1),
        }
        print(
            f"{large}/{small} {NAMES[kind]}: bytes x{ratios['bytes']:.1f}, heap peak "
            f"x{ratios['heap_peak']:.2f}, RSS growth x{ratios['rss_growth']:.2f}"
        )
        figures |= {f"large_over_small_{key}_{n}": round(v, 3) for n, v in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[20.0, 200.0],
        help="comma-separated input sizes in MB (10^6 bytes), smallest first",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        mode, path, warm = args.child
        child(mode, Path(path), Path(warm))
        return
    with tempfile.TemporaryDirectory(prefix="tuneq-archive-upload-") as work:
        figures = run(args, Path(work))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
