"""The hosts' copies of uploaded files (tuneq/files/cache.py): bounded by size, the least
recently used going first, and never one that a job, in any process, is reading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tuneq.files.cache import SIZE_FILE, STALE_SECONDS, FileCache
from tuneq.files.models import File
from tuneq.files.service import file_cache, held_copy, local_copy
from tuneq.storage import open_store

from .service_fixtures import make_settings

REPO = Path(__file__).resolve().parents[1]


def _copy(files: Path, name: str, size: int) -> None:
    path = files / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def _used(cache: FileCache, file_id: str, at: float) -> None:
    with cache.hold(file_id):
        pass
    os.utime(cache.locks_dir / file_id, (at, at))


def test_an_extracted_archive_is_walked_once_for_its_size(tmp_path):
    files = tmp_path / "files"
    cache = FileCache(files, max_bytes=10**9)
    _copy(files, "file-img/digits/1.png", 120)
    _copy(files, "file-img/digits/2.png", 80)
    _used(cache, "file-img", time.time())

    assert cache.prune() == []
    assert (files / "file-img" / SIZE_FILE).read_text() == "200"
    _copy(files, "file-img/digits/3.png", 1)  # (never happens: copies do not change)
    assert [size for _, _, size in cache._entries()] == [200]  # the memo, not a new walk


def test_the_least_recently_used_copies_go_first_until_the_rest_fit(tmp_path):
    files = tmp_path / "files"
    cache = FileCache(files, max_bytes=150)
    _copy(files, "file-a.jsonl", 100)
    _copy(files, "file-b/digits/1.png", 120)  # an extracted archive: a folder
    _copy(files, "file-b/.entry", 80)
    _copy(files, "file-c.csv", 100)
    for n, file_id in enumerate(["file-b", "file-a", "file-c"]):
        _used(cache, file_id, 1_000_000 + n)

    assert cache.prune() == ["file-b", "file-a"]  # 400 bytes, 150 kept: the oldest two go

    assert sorted(p.name for p in files.iterdir()) == [".locks", "file-c.csv"]
    assert sorted(p.name for p in cache.locks_dir.iterdir()) == ["file-c"]
    assert cache.prune() == []  # 100 bytes fit


def test_a_copy_that_predates_the_locks_ages_by_its_own_time(tmp_path):
    files = tmp_path / "files"
    cache = FileCache(files, max_bytes=100)
    _copy(files, "file-old.jsonl", 100)
    os.utime(files / "file-old.jsonl", (1_000_000, 1_000_000))
    _copy(files, "file-new.jsonl", 100)
    _used(cache, "file-new", time.time())

    assert cache.prune() == ["file-old"]


HOLDER = """
import sys, time
from pathlib import Path
from tuneq.files.cache import FileCache
with FileCache(Path(sys.argv[1]), 0).hold(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_copy_held_by_another_process_stays_and_a_killed_holder_pins_nothing(tmp_path):
    files = tmp_path / "files"
    cache = FileCache(files, max_bytes=0)
    _copy(files, "file-a.jsonl", 10)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(files), "file-a"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert cache.prune() == [] and cache.evict("file-a") is False
        assert (files / "file-a.jsonl").is_file()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

    assert cache.prune() == ["file-a"]  # the kernel dropped the dead worker's lock
    assert not (files / "file-a.jsonl").exists()


def test_a_copy_made_while_held_never_vanishes_under_a_racing_eviction(tmp_path):
    """Eviction removes the lock file too: a holder that opened the old one just before
    must notice and lock the new one, or the next eviction would take its copy."""
    files = tmp_path / "files"
    cache, evicting = FileCache(files, max_bytes=0), FileCache(files, max_bytes=0)
    stop, lost = threading.Event(), []

    def evict_all_the_time() -> None:
        while not stop.is_set():
            evicting.evict("file-a")

    thread = threading.Thread(target=evict_all_the_time)
    thread.start()
    try:
        for _ in range(300):
            with cache.hold("file-a"):
                _copy(files, "file-a.jsonl", 10)
                time.sleep(0.0005)
                if not (files / "file-a.jsonl").is_file():
                    lost.append(1)
    finally:
        stop.set()
        thread.join()
    assert lost == []


def test_what_a_killed_download_left_is_cleared_once_stale(tmp_path):
    files = tmp_path / "files"
    cache = FileCache(files, max_bytes=10**9)
    _copy(files, ".file-a.jsonl.k2j3.tmp", 10)  # a download's temporary file
    _copy(files, ".file-b-x7q/archive", 10)  # an extraction's temporary folder
    _copy(files, ".file-c.jsonl.p0p0.tmp", 10)  # a download still going on
    dead = time.time() - STALE_SECONDS - 60
    for name in (".file-a.jsonl.k2j3.tmp", ".file-b-x7q"):
        os.utime(files / name, (dead, dead))
    _used(cache, "file-d", dead)  # a lock file is no leftover, however old

    assert cache.prune() == []

    assert sorted(p.name for p in files.iterdir()) == [".file-c.jsonl.p0p0.tmp", ".locks"]
    assert (cache.locks_dir / "file-d").is_file()


def _stored_file(settings, file_id: str, size: int) -> File:
    """A file as the API stores it: its object in the real (local) store, its row's fields."""
    store = open_store(settings)
    key = f"files/{file_id}"
    store.put_bytes(key, b'{"text": "x"}\n' * (size // 14))
    return File(id=file_id, storage_key=key, report={"syntax": "jsonl"})


def test_held_copies_keep_the_cache_within_its_bound_and_reuse_what_is_there(tmp_path):
    settings = make_settings(tmp_path, file_cache_bytes=1000)
    store = open_store(settings)
    one, two = _stored_file(settings, "file-one", 700), _stored_file(settings, "file-two", 700)
    files = settings.resolved_work_dir / "files"

    with held_copy(store, one, settings) as first:
        with held_copy(store, two, settings) as second:  # over the bound, but both in use
            assert first.is_file() and second.is_file()
        assert first.is_file()
    assert sorted(p.name for p in files.glob("file-*")) == ["file-one.jsonl", "file-two.jsonl"]

    with held_copy(store, two, settings) as again:  # the job after: one copy goes
        assert again == second
    assert [p.name for p in files.glob("file-*")] == ["file-two.jsonl"]

    assert file_cache(settings).evict("file-two") is True
    assert local_copy(store, two, settings.resolved_work_dir).is_file()  # downloaded again
