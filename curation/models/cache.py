"""Where models live on disk: the user's cache folder, written atomically, with a lock so that two processes
never train (or write) the same model at once."""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """``$CURATION_CACHE`` if set, else ``$XDG_CACHE_HOME/curation/models`` (``~/.cache/curation/models``)."""
    env = os.environ.get("CURATION_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "curation" / "models"


def model_dir(name: str, version: str) -> Path:
    return cache_root() / f"{name}-{version}"


@contextmanager
def file_lock(path: Path, wait_s: float = 3600.0) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed); waits up to ``wait_s`` for another holder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path}: still locked by another process after {wait_s:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; it becomes ``final`` (one rename) only if the block succeeds,
    so a reader sees a complete model folder or none."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # only under the caller's lock: an older, incomplete or stale copy
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
