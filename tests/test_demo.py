"""`tuneq demo` (what `make demo` runs), as a new user sees it: slow, a real model trains."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time

import httpx
import pytest

from tests.service_fixtures import TUNEQ_CLI, cli_env, pid_alive

pytestmark = pytest.mark.slow


def _start_demo(home, *options: str):
    return subprocess.Popen(
        [*TUNEQ_CLI, "demo", *options],
        env=cli_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a suite started in the background (CI) inherits SIGINT
        # ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _stack_pids(home) -> list[int]:
    return list(json.loads((home / "run" / "stack.json").read_text())["pids"].values())


def test_the_demo_teaches_its_habit_and_keeps_the_stack_up_when_asked(tmp_path):
    home = tmp_path / "demo"
    demo = _start_demo(home, "--keep")
    output, _ = demo.communicate(timeout=900)
    try:
        assert demo.returncode == 0, output[-4000:]

        losses = output.split("eval loss on the held-out validation file: ")[1].split(" (tuned")[0]
        before, after = (float(x) for x in losses.split(" (base model) -> "))
        assert after < before - 1.0, output
        table = output.split("answered greedily:")[1].split("done in")[0]
        tuned = [line.split(" | ", 1)[1] for line in table.splitlines() if " | " in line]
        assert sum(line.startswith("Arr, matey!") for line in tuned) >= 3, table  # the habit
        assert list((home / "demo").glob("job-*/adapter/adapter_model.safetensors"))

        # --keep: the dashboard it printed still answers, and the printed key sees the job
        url, key = output.split("dashboard ")[1].split(" : watch the job there, signed in with")
        url, key = url.rstrip("/"), key.split("the key ")[1].split()[0]
        assert "the stack keeps running (--keep)" in output
        assert httpx.get(f"{url}/").status_code == 200
        jobs = httpx.get(f"{url}/jobs", headers={"Authorization": f"Bearer {key}"}).json()
        assert [job["status"] for job in jobs["data"]] == ["succeeded"]
    finally:
        pids = _stack_pids(home) if (home / "run" / "stack.json").exists() else []
        down = subprocess.run([*TUNEQ_CLI, "down"], env=cli_env(home), capture_output=True)
    assert b"stopped api, worker, beat" in down.stdout, down.stdout + down.stderr
    assert not any(map(pid_alive, pids)) and not (home / "run" / "stack.json").exists()


def test_ctrl_c_mid_way_cancels_the_job_and_leaves_no_process(tmp_path):
    home = tmp_path / "demo"
    demo = _start_demo(home)
    lines = []
    for line in demo.stdout:
        lines.append(line)
        if line.startswith("step "):  # training has begun
            break
    else:
        pytest.fail("".join(lines[-40:]))
    pids = _stack_pids(home)
    demo.send_signal(signal.SIGINT)
    rest, _ = demo.communicate(timeout=120)
    assert demo.returncode == 130, "".join(lines) + rest
    assert "interrupted: cancelling the job" in rest

    deadline = time.monotonic() + 10
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(pid_alive, pids)), "a stack process outlived the demo"
    with sqlite3.connect(home / "tuneq.db") as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("cancelled",)]
