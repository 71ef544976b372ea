"""The manifest of a release, verifying it, and publishing a finished release to another folder or an fsspec URL (s3://...).

A release is built in RUN_DIR/release first; publishing copies the files the manifest lists, then the manifest
itself last, so a reader that finds ``manifest.json`` at the destination finds a complete release.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from curation.fsutil import atomic_path


def file_entry(release_dir: Path, path: Path, **extra: Any) -> dict[str, Any]:
    """A manifest ``files`` entry: path relative to the release, size, sha256 (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return {"path": path.relative_to(release_dir).as_posix(), "size": path.stat().st_size, "sha256": h.hexdigest(),
            **extra}  # fmt: skip


def write_manifest(release_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (files sorted by path, no timestamps)."""
    manifest = {**manifest, "files": sorted(manifest["files"], key=lambda e: e["path"])}
    path = release_dir / "manifest.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def verify_release(release_dir: Path) -> list[str]:
    """Problems found re-hashing every file the manifest lists (empty when the release is intact)."""
    manifest = json.loads((release_dir / "manifest.json").read_text())
    problems = []
    for entry in manifest["files"]:
        path = release_dir / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
            continue
        got = file_entry(release_dir, path)
        if (got["size"], got["sha256"]) != (entry["size"], entry["sha256"]):
            problems.append(f"{entry['path']}: size/sha256 {got['size']}/{got['sha256']} != manifest")
    return problems


def publish(release_dir: Path, out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Copy the release in ``release_dir`` to ``out`` (a folder or fsspec URL); the manifest goes last, then every
    file's size is checked at the destination. Returns {"out", "files", "bytes"}."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    root = root.rstrip("/")
    manifest = json.loads((release_dir / "manifest.json").read_text())
    entries = [*manifest["files"], {"path": "manifest.json", "size": (release_dir / "manifest.json").stat().st_size}]
    made: set[str] = set()
    for entry in entries:
        target = f"{root}/{entry['path']}"
        parent = target.rsplit("/", 1)[0]
        if parent not in made:
            fs.makedirs(parent, exist_ok=True)
            made.add(parent)
        fs.put_file(str(release_dir / entry["path"]), target)
    fs.invalidate_cache()
    for entry in entries:
        size = fs.size(f"{root}/{entry['path']}")
        if size != entry["size"]:
            raise OSError(f"publishing to {out}: {entry['path']} is {size} bytes there, {entry['size']} here")
    return {"out": out, "files": len(entries), "bytes": sum(e["size"] for e in entries)}
