"""Small file helpers: writes that are all-or-nothing, so a killed run never leaves half a file that counts, and an
index of the members of a tar shard."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


_BLOCK = 512


def tar_index(path: str | Path) -> dict[str, tuple[int, int]]:
    """Member name -> (offset of its data, size) for the regular files of an uncompressed tar.

    Reads one 512-byte header per member and seeks past the data: several times faster than iterating
    ``tarfile`` (which builds a ``TarInfo`` per member), and the score stage indexes every crawl shard it reads.
    Tars with extended headers (PAX, GNU long names), which webdataset's writer does not make for short names,
    are handed to ``tarfile``."""
    out: dict[str, tuple[int, int]] = {}
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(_BLOCK)
            if len(header) < _BLOCK or header == bytes(_BLOCK):
                return out
            kind = header[156:157]
            if kind not in (b"0", b"\0", b"5") or header[257:262] != b"ustar":
                return _tarfile_index(path)
            size = _tar_number(header[124:136])
            if kind != b"5":
                name = header[:100].split(b"\0", 1)[0].decode("utf-8")
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
                out[f"{prefix}/{name}" if prefix else name] = (pos + _BLOCK, size)
            pos += _BLOCK + -(-size // _BLOCK) * _BLOCK


def _tar_number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _tarfile_index(path: str | Path) -> dict[str, tuple[int, int]]:
    import tarfile

    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
