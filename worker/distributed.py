"""A job across several GPUs: the engine under torchrun, owned by the worker's attempt.

`resources.gpus` > 1 runs `python -m torch.distributed.run --nproc_per_node N -m peft_engine
train ...` as a child of the worker (peft_engine/distributed.py: data parallel, NCCL on
GPUs, gloo on a CPU). The lease, heartbeats, checkpoint uploads, cancel and resume stay the
worker's: rank 0 writes its hook calls to a report file that this module reads while the
ranks run and replays on the attempt's hooks, in order, on the attempt's thread
(peft_engine/report.py); a stop (cancel, a lost lease, shutdown) is a stop file every rank
sees before its next step. A rank that dies takes the others with it (torchrun, no
restarts) and the attempt crashes: the retry rules hand the job back and the next attempt
resumes from the last uploaded checkpoint, on any number of ranks. The ranks die with the
worker too: torchrun gets SIGTERM when the worker's thread that started it ends (the
kernel's parent-death signal) and stops its ranks, and each rank is killed when torchrun
goes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft_engine.errors import UserError
from peft_engine.hooks import Hooks
from peft_engine.prepare import DataPaths
from peft_engine.report import ReportReader, die_with_parent, dispatch

if TYPE_CHECKING:
    from peft_engine.training import TrainResult

POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 30.0  # torchrun's own grace for its ranks, then SIGKILL
LOG_TAIL_CHARS = 4000


class RanksFailed(RuntimeError):
    """The ranks ended without a result: a rank died or crashed (the log's tail says how)."""


def check_gpus(gpus: int) -> None:
    """Refuse a job that asks for more GPUs than this worker's machine has (a CPU worker
    runs that many processes instead)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        err = UserError(
            f"the job asks for {gpus} GPUs and this worker has {torch.cuda.device_count()}; "
            "route it to a queue whose workers have that many",
            param="resources.gpus",
        )
        err.code = "insufficient_gpus"
        raise err


def train_on_ranks(
    spec: dict[str, Any],
    workdir: Path,
    hooks: Hooks,
    *,
    gpus: int,
    data: DataPaths,
    resume_from: Path | None,
    registry_file: Path | None,
    cache_dir: Path,
) -> TrainResult:
    """Run the job on `gpus` ranks under torchrun; what `peft_engine.train` returns, without
    the model (it stays in the ranks)."""
    check_gpus(gpus)
    channel = workdir / "ranks"
    channel.mkdir(parents=True, exist_ok=True)
    report, stop = channel / "report.jsonl", channel / "stop"
    for stale in (report, stop):  # an earlier attempt's, in a reused workdir
        stale.unlink(missing_ok=True)
    spec_file = channel / "spec.json"
    spec_file.write_text(json.dumps(spec))
    command = _command(gpus, spec_file, workdir, data, resume_from, registry_file, cache_dir)
    command += ["--report", str(report), "--stop-file", str(stop)]
    log_path = channel / "torchrun.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_rank_environment(gpus),
            preexec_fn=lambda: die_with_parent(signal.SIGTERM),  # noqa: PLW1509
        )
    try:
        end = _follow(process, ReportReader(report), stop, hooks)
    finally:
        _stop(process)
    return _outcome(end, process.returncode, log_path)


def _command(
    gpus: int,
    spec_file: Path,
    workdir: Path,
    data: DataPaths,
    resume_from: Path | None,
    registry_file: Path | None,
    cache_dir: Path,
) -> list[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={gpus}", "--max_restarts=0", "-m", "peft_engine"]  # fmt: skip
    if registry_file is not None:
        command += ["--registry", str(registry_file)]
    command += ["--cache-dir", str(cache_dir), "train", str(spec_file), "--out", str(workdir)]
    command += ["--data", str(data.train)]
    if data.validation is not None:
        command += ["--validation", str(data.validation)]
    if resume_from is not None:
        command += ["--resume", str(resume_from)]
    return command


def _rank_environment(gpus: int) -> dict[str, str]:
    """The worker's environment; on a CPU, each rank's share of the cores for torch."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // gpus))
    return env


def _follow(
    process: subprocess.Popen[bytes], reader: ReportReader, stop: Path, hooks: Hooks
) -> dict[str, Any] | None:
    """Replay the ranks' report on `hooks` until they exit; their end line, if any."""
    end: dict[str, Any] | None = None
    while True:
        exited = process.poll() is not None
        for line in reader.read_new():  # after an exit: the lines written before it
            if line["type"] in ("result", "error", "crash"):
                end = line
            else:
                dispatch(line, hooks)
        if exited:
            return end
        if not stop.exists() and hooks.should_stop():
            stop.touch()  # every rank stops at the same step; rank 0 checkpoints first
        time.sleep(POLL_SECONDS)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Make sure the ranks are gone (a hook raised, the worker stops): SIGTERM to torchrun,
    which stops its ranks, then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_SECONDS + 5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _outcome(end: dict[str, Any] | None, returncode: int | None, log_path: Path) -> TrainResult:
    from peft_engine.training import TrainResult  # torch: not in the API's imports

    if end is not None and end["type"] == "result":
        output = Path(end["output_dir"]) if end["output_dir"] else None
        return TrainResult(end["status"], output, end["result"])
    if end is not None and end["type"] == "error":
        err = UserError(end["message"], param=end.get("param"))
        err.code = end["code"]
        raise err
    tail = log_path.read_bytes()[-LOG_TAIL_CHARS:].decode("utf-8", "replace")
    cause = f": rank 0 raised {end['error']}" if end is not None else ""
    raise RanksFailed(
        f"the ranks failed (torchrun exit status {returncode}){cause}; their log ends: {tail}"
    )
