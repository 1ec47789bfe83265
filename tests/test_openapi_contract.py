"""The OpenAPI document is the contract: schemathesis, every check, against `tuneq up`.

The stack is the real embedded one (API, worker and beat processes) with a team key, on a
registry of one tiny random model whose queue no worker listens on: every job the fuzzer
creates is validated and planned for real (files, tokenizer, estimate), then stays queued,
so no training competes with the run for the machine's cores and the run does the same
work every time. Cancelling, pausing, deleting and reading those jobs are real.

Longer runs (README, "The API contract"): `.venv/bin/python -m tests.test_openapi_contract
DIR` starts the same stack and prints its URL and key, to run schemathesis against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import build_tiny_llama, build_tiny_tokenizer, local_model, write_registry
from tests.service_fixtures import auth, chat_file, run_cli

SEED = 18
EXAMPLES = 12  # per operation and phase: the run stays within about two minutes on 2 cores
# Enough examples for any batch_size a spec may ask (1024) after any validation split (half).
TRAINING_EXAMPLES = 2 * 1024 + 16
MAX_SEQ_LENGTH = 131072  # the largest a spec may ask
SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "schemathesis.toml"


@dataclass(frozen=True)
class ContractStack:
    home: Path
    url: str
    key: str
    training_file: str
    spare_key_prefix: str  # revoked in place of the run's own key (tests/schemathesis_hooks.py)

    def env(self) -> dict[str, str]:
        return stack_env(self.home)

    def exports(self) -> dict[str, str]:
        """What the run's shell needs: the URL, the key, and the spare key's prefix."""
        return {
            "TUNEQ_URL": self.url,
            "TUNEQ_API_KEY": self.key,
            "TUNEQ_SPARE_KEY_PREFIX": self.spare_key_prefix,
        }

    def command(self, *, examples: int = EXAMPLES, seed: int = SEED) -> list[str]:
        """The schemathesis run of `make test` (more examples, another seed: a longer one)."""
        return [
            SCHEMATHESIS,
            f"--config-file={CONFIG}",
            "run",
            f"{self.url}/openapi.json",
            "--checks=all",
            "--phases=examples,coverage,fuzzing,stateful",
            f"--max-examples={examples}",
            f"--seed={seed}",
            "--workers=1",
            "--request-timeout=30",
            f"--header=Authorization: Bearer {self.key}",
        ]


def stack_env(home: Path) -> dict[str, str]:
    return {
        "TUNEQ_MODEL_REGISTRY": str(home / "models.json"),
        "TUNEQ_CACHE_DIR": str(home / "cache"),
        # An event stream of a job that never ends closes soon, not in an hour.
        "TUNEQ_SSE_MAX_SECONDS": "2",
        # No worker listens on the jobs' inference queue: a generate request waits this long.
        "TUNEQ_GENERATE_WAIT_SECONDS": "1",
        # The fuzzer sends as fast as the API answers; the limiter has tests of its own.
        "TUNEQ_RATE_LIMIT_PER_SECOND": "10000",
        "TUNEQ_RATE_LIMIT_BURST": "100000",
    }


def tiny_registry(home: Path) -> Path:
    """One tiny random Llama, trained on a queue no worker of `tuneq up` listens on, with a
    context as long as any max_seq_length a spec may ask (no weights depend on it)."""
    llama = home / "models" / "tiny-llama"
    llama.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    tokenizer.save_pretrained(llama)
    build_tiny_llama(llama, vocab_size=len(tokenizer))
    config = json.loads((llama / "config.json").read_text())
    config["max_position_embeddings"] = MAX_SEQ_LENGTH
    (llama / "config.json").write_text(json.dumps(config))
    entry = local_model(llama, "llama", ["causal_lm"]) | {"queue": "contract-unserved"}
    return write_registry(home / "models.json", {"tiny-llama": entry})


def start(home: Path) -> ContractStack:
    """Build the tiny model, start the stack, and give the team something to fuzz: a valid
    chat file, a job on it (queued for good) and a webhook. The fuzzer finds their ids in
    the lists and uses them, so the routes on a real job, file and webhook answer too."""
    home.mkdir(parents=True, exist_ok=True)
    tiny_registry(home)
    up = run_cli(home, "up", **stack_env(home))
    if up.returncode != 0:
        raise RuntimeError(f"tuneq up failed:\n{up.stdout}\n{up.stderr}")
    lines = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    url, key = lines["TUNEQ_URL"], lines["TUNEQ_API_KEY"]
    with httpx.Client(base_url=url, headers=auth(key), timeout=60) as api:
        uploaded = api.post(
            "/files",
            files={"file": ("chats.jsonl", chat_file(TRAINING_EXAMPLES))},
            data={"purpose": "fine-tune"},
        )
        training_file = created(uploaded)["id"]
        created(api.post("/jobs", json={"model": "tiny-llama", "training_file": training_file}))
        # a public address: registration passes the SSRF checks without resolving a name
        hook = {"url": "https://8.8.8.8/hook", "events": ["job.succeeded"]}
        created(api.post("/webhooks", json=hook))
        spare = created(api.post("/keys", json={"name": "revoked-instead"}))["prefix"]
    return ContractStack(home, url, key, training_file, spare)


def created(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 201:
        raise RuntimeError(f"{response.request.url}: {response.status_code} {response.text}")
    return response.json()


@pytest.fixture
def stack(tmp_path):
    running = start(tmp_path / "state")
    try:
        yield running
    finally:
        run_cli(running.home, "down", **running.env())


@pytest.mark.slow
def test_schemathesis_finds_no_failure(stack, tmp_path):
    # From a directory of its own (hypothesis keeps its database there), with the hooks'
    # module importable and the run's key known to it.
    env = os.environ | {"PYTHONPATH": str(ROOT)} | stack.exports()
    run = subprocess.run(
        stack.command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]


if __name__ == "__main__":
    # README, "The API contract": eval "$(python -m tests.test_openapi_contract DIR)"
    started = start(Path(sys.argv[1]).resolve())
    print("export " + " ".join(f"{name}={value}" for name, value in started.exports().items()))
    print(f"# the training file {started.training_file} is uploaded; `make test` runs:")
    print("# " + " ".join(f"'{part}'" if " " in part else part for part in started.command()))
    print(f"# stop with: TUNEQ_HOME={started.home} .venv/bin/tuneq down")
