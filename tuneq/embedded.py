"""The embedded stack: the API, a worker and beat as local processes (DESIGN §2).

Everything lives under TUNEQ_HOME (./.tuneq): the SQLite database, the filesystem broker,
the artifact directory, the model cache, the processes' logs and `run/stack.json`, which
records what is running so that `tuneq down` (or a second `tuneq up`) can find it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tuneq.db import make_engine, make_sessionmaker, transaction
from tuneq.errors import Conflict, Unavailable
from tuneq.settings import Settings
from tuneq.teams.service import create_key, create_team, find_team

PROCESSES = ("api", "worker", "beat")
_STOP_GRACE_SECONDS = 30.0


@dataclass
class EmbeddedStack:
    settings: Settings
    port: int
    pids: dict[str, int] = field(default_factory=dict)
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_settings(cls, settings: Settings) -> EmbeddedStack:
        """A stack on TUNEQ_PORT when it is set, otherwise on a free port."""
        port = settings.port if "port" in settings.model_fields_set else _free_port()
        return cls(settings, port)

    @property
    def home(self) -> Path:
        return self.settings.home.resolve()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Migrate, then start the API, a worker and beat; refuses when one already runs."""
        running = running_stack(self.settings)
        if running is not None:
            raise Conflict(f"a tuneq stack already runs at {running.url}; `tuneq down` stops it")
        from tuneq.migrate import upgrade

        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        upgrade(self.settings.resolved_database_url)
        env = os.environ | {
            "TUNEQ_HOME": str(self.home),
            "TUNEQ_HOST": "127.0.0.1",
            "TUNEQ_PORT": str(self.port),
            "PYTHONUNBUFFERED": "1",
        }
        try:
            for name in PROCESSES:
                with (self.logs / f"{name}.log").open("ab") as log:
                    child = subprocess.Popen(
                        [sys.executable, "-m", "tuneq.cli", name],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # Ctrl-C in our terminal is ours to handle
                    )
                self._children[name] = child
                self.pids[name] = child.pid
        finally:
            self._write_run_file()

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until /readyz answers 200; fails early, with the log's tail, if a process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _alive(pid, self._children.get(name)):
                    raise Unavailable(f"the {name} process exited:\n{self.log_tail(name)}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise Unavailable(f"the API at {self.url} was not ready after {timeout:.0f}s")

    def stop(self) -> list[str]:
        """SIGTERM every process group, wait, SIGKILL what is left; returns what was stopped."""
        stopped = []
        for name, pid in self.pids.items():
            if _alive(pid, self._children.get(name)):
                _signal_group(pid, signal.SIGTERM)
                stopped.append(name)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        for name, pid in self.pids.items():
            while _alive(pid, self._children.get(name)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid, self._children.get(name)):
                _signal_group(pid, signal.SIGKILL)
                _alive(pid, self._children.get(name))  # reap it
        self._run_file.unlink(missing_ok=True)
        return stopped

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- the run file ------------------------------------------------------------------

    @property
    def _run_file(self) -> Path:
        return self.home / "run" / "stack.json"

    def _write_run_file(self) -> None:
        self._run_file.parent.mkdir(parents=True, exist_ok=True)
        self._run_file.write_text(json.dumps({"port": self.port, "pids": self.pids}))


def running_stack(settings: Settings) -> EmbeddedStack | None:
    """The stack recorded under TUNEQ_HOME, if any of its processes still runs."""
    path = settings.home.resolve() / "run" / "stack.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    stack = EmbeddedStack(settings, int(recorded["port"]), dict(recorded["pids"]))
    if not any(_alive(pid) for pid in stack.pids.values()):
        path.unlink(missing_ok=True)  # left by a stack that died without `down`
        return None
    return stack


def local_key(settings: Settings, team_name: str) -> str:
    """A new API key for `team_name`, creating the team on first use."""
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_sessionmaker(engine)) as db:
            team = find_team(db=db, name=team_name) or create_team(db=db, name=team_name)
            _, key = create_key(db=db, team=team)
        return key
    finally:
        engine.dispose()


def _alive(pid: int, child: subprocess.Popen[bytes] | None = None) -> bool:
    if child is not None:
        return child.poll() is None  # also reaps our own children
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
