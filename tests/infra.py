"""The real PostgreSQL and Redis the tests talk to (DESIGN §8), found or started here.

Each service is the machine's own when one answers on loopback, else a throwaway server
started from the binaries in a temporary directory and stopped at exit. When neither is
possible the suite fails with one line naming the service; it never skips silently.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

T = TypeVar("T")

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
# Set in a Redis database this session uses, so that a later session can tell it apart.
REDIS_CLAIM_KEY = "tuneq:test-session"


class ServiceUnavailable(Exception):
    """A service the tests need is neither running nor startable here."""


def require(service: Callable[[], T]) -> T:
    """`service()`, or fail the test with one line naming what is missing."""
    try:
        return service()
    except ServiceUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


# ----------------------------------------------------------------------------- PostgreSQL


@cache
def postgres_url() -> str:
    """A superuser URL of a PostgreSQL server: the machine's, or a throwaway cluster."""
    url = make_url(os.environ.get("TUNEQ_TEST_POSTGRES", DEFAULT_POSTGRES))
    where = f"{url.host}:{url.port or 5432}"
    if _port_open(url.host or "127.0.0.1", url.port or 5432):
        candidates = [url] if url.username == "root" else [url, url.set(username="root")]
        for candidate in candidates:
            if _postgres_answers(candidate):
                return _render(candidate)
        missing = f"cannot log in to {where} as {' or '.join(c.username for c in candidates)}"
    else:
        missing = f"no server on {where}"
    binaries = _postgres_binaries()
    if binaries is None:
        raise ServiceUnavailable(f"PostgreSQL: {missing} and no initdb/pg_ctl binaries found")
    return _start_throwaway_postgres(binaries)


def fresh_postgres_database(base_url: str) -> str:
    """Create an empty database on base_url's server; return its URL."""
    name = f"tuneq_test_{secrets.token_hex(6)}"
    engine = create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    return _render(make_url(base_url).set(database=name))


def drop_postgres_database(url: str) -> None:
    target = make_url(url)
    engine = create_engine(
        target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    with engine.connect() as connection:
        # FORCE (PostgreSQL 13+) ends sessions a failed test left open on the database.
        force = " WITH (FORCE)" if connection.dialect.server_version_info >= (13,) else ""
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{target.database}"{force}')


def _postgres_answers(url: URL) -> bool:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except OperationalError:
        return False


def _postgres_binaries() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then the Debian layout."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in map(Path, versions):
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _start_throwaway_postgres(bin_dir: Path) -> str:
    root = Path(tempfile.mkdtemp(prefix="tuneq-pg-"))
    data, port = root / "data", _free_port()
    # PostgreSQL refuses to run as root: run it as the `postgres` user when we are root.
    user = "postgres" if os.geteuid() == 0 else None
    if user is not None:
        try:
            shutil.chown(root, user=user)
        except LookupError:
            raise ServiceUnavailable(
                "PostgreSQL: no server running, and as root a throwaway cluster needs a "
                "'postgres' user to run as"
            ) from None

    def run(*args: str) -> None:
        done = subprocess.run(args, cwd=root, user=user, capture_output=True, text=True)
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip()
            raise ServiceUnavailable(f"PostgreSQL: {Path(args[0]).name} failed: {output}")

    initdb = ["-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C"]
    run(str(bin_dir / "initdb"), *initdb, "--no-sync")
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )

    def stop() -> None:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            cwd=root,
            user=user,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    log = str(root / "server.log")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", log, "-o", options, "-w", "start")
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"


# ----------------------------------------------------------------------------- Redis


@cache
def redis_url() -> str:
    """redis://host:port/<n>: a database of its own on the machine's Redis or a throwaway one.

    n is a database in 1..15 that was empty (or left by a dead session of this machine);
    it is flushed at exit, so runs stay apart from other users of the server.
    """
    base = os.environ.get("TUNEQ_TEST_REDIS", DEFAULT_REDIS)
    if not _redis_answers(base):
        base = _start_throwaway_redis(base)
    return _claim_redis_database(base)


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def _start_throwaway_redis(wanted: str) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceUnavailable(f"Redis: nothing answers PING at {wanted} and no redis-server")
    port = _free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(_stop_process, server)
    url = f"redis://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while not _redis_answers(url):
        if server.poll() is not None or time.monotonic() > deadline:
            raise ServiceUnavailable(f"Redis: a throwaway redis-server on port {port} failed")
        time.sleep(0.05)
    return url


# Claims a database atomically: one that is empty, or that a dead session of ours claimed.
_CLAIM = """
if redis.call('DBSIZE') == 0 or redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('FLUSHDB')
    redis.call('SET', KEYS[1], ARGV[1])
    return 1
end
return 0
"""


def _claim_redis_database(base: str) -> str:
    base = urlunsplit(urlsplit(base)._replace(path=""))  # the server; we pick the database
    me = f"{socket.gethostname()}:{os.getpid()}"
    for n in range(1, 16):
        with redis.Redis.from_url(f"{base}/{n}", decode_responses=True) as client:
            owner = client.get(REDIS_CLAIM_KEY)
            stale = owner if owner and _is_dead_local_session(owner) else ""
            if client.eval(_CLAIM, 1, REDIS_CLAIM_KEY, me, stale):
                atexit.register(_flush_redis_database, f"{base}/{n}")
                return f"{base}/{n}"
    raise ServiceUnavailable(
        f"Redis: databases 1-15 at {base} all hold data; flush one (FLUSHDB) to run the tests"
    )


def _is_dead_local_session(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False


def _flush_redis_database(url: str) -> None:
    try:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
    except redis.RedisError:
        pass  # a throwaway server may already be gone


# ----------------------------------------------------------------------------- helpers


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)
