"""The user's `tuneq` commands, run as a user runs them: subprocesses against a whole
deployment (the API over HTTP, a worker and beat as processes), a tiny model training.

Embedded: started with `tuneq up`, its two printed lines exported, as the README says.
Production: PostgreSQL, Redis and S3 (moto), so downloads go through presigned URLs.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys

import httpx
import pytest

from tests.api_helpers import job_spec
from tests.conftest import chat, logits_from_plain_peft, write_jsonl
from tests.service_fixtures import cli_env, run_cli
from tests.stack import Stack, production_services, wait_for

pytestmark = pytest.mark.e2e

TRAIN = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40)]
VALIDATION = [chat(f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.") for i in range(40, 48)]
FAST = {
    "TUNEQ_LEASE_TTL_SECONDS": "3",
    "TUNEQ_RELAY_INTERVAL_SECONDS": "1",
    "TUNEQ_ESTIMATED_TOKENS_PER_SECOND": "1000",
}


@pytest.fixture(scope="module", params=["embedded", "production"])
def deployment(request, tmp_path_factory, tiny_registry_file):
    """(home, TUNEQ_URL, TUNEQ_API_KEY) of a running deployment."""
    home = tmp_path_factory.mktemp(f"cli-{request.param}")
    if request.param == "embedded":
        up = run_cli(home, "up", TUNEQ_MODEL_REGISTRY=str(tiny_registry_file), **FAST)
        try:
            assert up.returncode == 0, up.stdout + up.stderr
            printed = dict(
                line.split("=", 1) for line in up.stdout.splitlines() if line.startswith("TUNEQ_")
            )
            yield home, printed["TUNEQ_URL"], printed["TUNEQ_API_KEY"]
        finally:
            run_cli(home, "down")
        return
    with production_services("tuneq-cli") as overrides:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        overrides |= {"model_registry": str(tiny_registry_file), "port": port}
        stack = Stack("production", home, overrides)
        stack.setup()
        try:
            for process in ("api", "worker", "beat"):
                stack.start(process)
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ready(url), timeout=120, what="the API to be ready")
            yield home, url, stack.team_key("cli")
        finally:
            stack.stop_all()


def _ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/readyz").status_code == 200
    return False


@pytest.fixture(scope="module")
def tuneq(deployment):
    """`tuneq ARGS...` as the user who exported TUNEQ_URL and TUNEQ_API_KEY."""
    home, url, key = deployment

    def run(*args: str, timeout: float = 300):
        return run_cli(home, *args, timeout=timeout, TUNEQ_URL=url, TUNEQ_API_KEY=key)

    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_jsonl(directory / "train.jsonl", TRAIN)
    write_jsonl(directory / "validation.jsonl", VALIDATION)
    rows = [*TRAIN[:3], "not json", {"messages": []}]
    write_jsonl(directory / "bad.jsonl", rows)
    spec = job_spec("-", suffix="cli")
    del spec["training_file"]
    (directory / "spec.json").write_text(json.dumps(spec))
    return directory


def test_upload_prints_the_report_and_a_bad_file_its_lines(tuneq, data):
    uploaded = tuneq("files", "upload", str(data / "train.jsonl"))
    assert uploaded.returncode == 0, uploaded.stderr
    assert "40 chat examples" in uploaded.stdout
    assert "messages_by_role: assistant 40, user 40" in uploaded.stdout

    bad = tuneq("files", "upload", str(data / "bad.jsonl"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert "error: 2 problems found (invalid_training_file, HTTP 422)" in bad.stderr
    assert "line 4: not valid JSON" in bad.stderr
    assert "line 5, messages: the conversation is empty" in bad.stderr

    as_json = tuneq("files", "upload", str(data / "bad.jsonl"), "--json")
    assert as_json.returncode == 2 and as_json.stdout == ""
    assert [e["line"] for e in json.loads(as_json.stderr)["errors"]] == [4, 5]


def test_create_follow_download_and_load_with_plain_peft(tuneq, data, tmp_path, tiny_model_dir):
    validation = tuneq("files", "upload", str(data / "validation.jsonl"), "--json")
    assert validation.returncode == 0, validation.stderr
    validation_id = json.loads(validation.stdout)["id"]

    created = tuneq(
        "jobs", "create",
        "--spec", str(data / "spec.json"),
        "--model", "tiny-llama",
        "--training-file", str(data / "train.jsonl"),  # a path: uploaded first
        "--validation-file", validation_id,
        "--set", "hyperparameters.eval_every_steps=5",
        "--set", "hyperparameters.checkpoint_every_steps=5",
        "--set", "metadata.owner=cli",
        "--follow",
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    out = created.stdout
    assert "uploaded file-" in out and "created job-" in out and "lora on tiny-llama" in out
    assert "step 1/20 loss" in out and "step 20/20" in out  # plain lines: not a terminal
    assert "eval (base model): " in out and "eval (step 5): " in out  # each evaluation
    job_id = out.split("created ")[1].split(":")[0]
    assert out.rstrip().splitlines()[-1].startswith(f"{job_id} succeeded: eval loss")

    listed = tuneq("jobs", "list", "--json")
    job = next(j for j in json.loads(listed.stdout)["data"] if j["id"] == job_id)
    assert job["status"] == "succeeded" and job["metadata"] == {"owner": "cli"}
    assert job["suffix"] == "cli" and job["validation_file"] == validation_id

    checkpoints = json.loads(tuneq("jobs", "checkpoints", job_id, "--json").stdout)
    assert [c["step"] for c in checkpoints["data"]] == [5, 10, 15]
    metrics = tuneq("jobs", "metrics", job_id)
    assert metrics.returncode == 0 and "eval (5 points)" in metrics.stdout
    diagnostics = tuneq("jobs", "diagnostics", job_id)
    assert diagnostics.returncode == 0, diagnostics.stderr
    assert "worst validation examples (validation_file)" in diagnostics.stdout
    events = json.loads(tuneq("jobs", "events", job_id, "--json").stdout)["data"]
    assert events[-1]["message"] == "job succeeded"

    adapter = tmp_path / "adapter"
    downloaded = tuneq("jobs", "download", job_id, "-o", str(adapter))
    assert downloaded.returncode == 0, downloaded.stderr
    assert f"unpacked into {adapter}" in downloaded.stdout
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    (tmp_path / "scratch").mkdir()
    tuned = logits_from_plain_peft(tiny_model_dir, adapter, ids, tmp_path / "scratch")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert not torch.allclose(base, tuned)  # the adapter loaded, and it changes the output

    checkpoint = tuneq(
        "jobs", "download", job_id, "--checkpoint", "10", "-o", str(tmp_path / "c10"), "--json"
    )
    assert json.loads(checkpoint.stdout)["path"] == str(tmp_path / "c10")
    assert (tmp_path / "c10" / "adapter_model.safetensors").is_file()
    again = tuneq("jobs", "download", job_id, "-o", str(adapter))
    assert again.returncode == 2 and "is not an empty directory" in again.stderr


def test_following_a_cancelled_job_exits_3_and_json_lines_parse(tuneq, data):
    created = tuneq(
        "jobs", "create", "--json",
        "--spec", str(data / "spec.json"),
        "--model", "tiny-llama",
        "--training-file", str(data / "train.jsonl"),
        "--set", "hyperparameters.n_epochs=50",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    job_id = json.loads(created.stdout)["id"]  # the uploaded file's report is not printed
    cancelled = tuneq("jobs", "cancel", job_id)
    assert cancelled.returncode == 0 and cancelled.stdout.startswith(f"{job_id}: cancel")

    followed = tuneq("jobs", "follow", job_id, "--json")
    assert followed.returncode == 3, followed.stderr
    documents = [json.loads(line) for line in followed.stdout.splitlines()]
    assert documents[-1]["id"] == job_id and documents[-1]["status"] == "cancelled"
    assert all(d["object"] == "job.event" for d in documents[:-1])
    assert tuneq("jobs", "get", job_id).stdout.startswith(f"{job_id}: cancelled")


def test_usage_and_api_errors_exit_2_with_one_clear_line(tuneq, tmp_path):
    missing = run_cli(tmp_path, "jobs", "list")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: TUNEQ_URL and TUNEQ_API_KEY not set")
    not_found = tuneq("jobs", "get", "job-nope")
    assert not_found.returncode == 2
    assert not_found.stderr.strip() == "error: no job 'job-nope' (not_found, HTTP 404)"
    bad_set = tuneq("jobs", "create", "--model", "tiny-llama", "--set", "method.r")
    assert bad_set.returncode == 2 and "expected PATH=VALUE" in bad_set.stderr


NO_TORCH = """
import sys
from tuneq.cli import main
code = main(["jobs", "list"])
print(code, sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules))
"""


def test_the_user_commands_never_load_torch(deployment):
    home, url, key = deployment
    env = cli_env(home, TUNEQ_URL=url, TUNEQ_API_KEY=key)
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr
