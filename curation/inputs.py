"""Reading ``input.path``: URL lists, img2dataset/webdataset folders and local media folders.

Every reader yields the same record table (:data:`INPUT_SCHEMA`), one row per input record, with a stable ``uid``
derived from where the record came from, so the same input always gives the same uids, shards and ledger.
Records that cannot be used (no URL, no caption, a URL that is not even a string) are kept in the table with an
``input_error``: the runner turns them into ledger rejects instead of dropping them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from curation.config import InputConfig

INPUT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("source", pa.string()),  # "<file>:<row>" or "<tar>:<key>" or the media file's relative path
        ("modality", pa.string()),
        ("url", pa.string()),  # http(s) URL to fetch, or null for local media
        ("local_path", pa.string()),  # a local media file, or the tar holding it
        ("tar_member", pa.string()),  # member name inside local_path when it is a tar
        ("caption", pa.string()),
        ("input_error", pa.string()),  # reason code when the row is unusable, else null
        ("input_detail", pa.string()),
    ]
)

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}
VIDEO_EXTS = {"mp4", "webm", "mkv", "mov", "avi", "m4v"}
AUDIO_EXTS = {"wav", "flac", "mp3", "ogg", "opus", "m4a"}
URL_COLUMNS = ("url", "URL", "image_url", "link")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "alt", "description")
URL_LIST_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def make_uid(*parts: str) -> str:
    """16 hex characters (no dots, so it doubles as the webdataset key)."""
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).hexdigest()


def modality_from_name(name: str | None) -> str | None:
    if not name:
        return None
    ext = PurePosixPath(name.split("?", 1)[0].split("#", 1)[0]).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    if ext in AUDIO_EXTS:
        return "audio"
    return None


def detect_format(path: Path) -> str:
    """Tell a URL list from a shard folder from a media folder."""
    if path.is_file():
        fmt = URL_LIST_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"input.path {path}: cannot tell the format from the suffix {path.suffix!r}; set input.format"
            )
        return fmt
    if not path.is_dir():
        raise ValueError(f"input.path {path}: no such file or folder")
    names = [p.name for p in path.iterdir()]
    if any(n.endswith(".tar") for n in names):
        return "img2dataset" if any(n.endswith("_stats.json") for n in names) else "webdataset"
    lists = {URL_LIST_SUFFIXES[Path(n).suffix.lower()] for n in names if Path(n).suffix.lower() in URL_LIST_SUFFIXES}
    if len(lists) == 1 and not any(modality_from_name(n) for n in names):
        return lists.pop()
    return "folder"


def read_input(cfg: InputConfig) -> pa.Table:
    """Read ``cfg.path`` into a table of :data:`INPUT_SCHEMA`."""
    path = Path(cfg.path).expanduser()
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt in ("parquet", "csv", "jsonl"):
        rows = _read_url_lists(path, fmt, cfg)
    elif fmt in ("img2dataset", "webdataset"):
        rows = _read_shard_folder(path, cfg)
    elif fmt == "folder":
        rows = _read_media_folder(path, cfg)
    else:  # validated by InputConfig, kept for direct callers
        raise ValueError(f"input.format {fmt!r} is not supported")
    table = pa.Table.from_pylist(list(_limited(rows, cfg.limit)), schema=INPUT_SCHEMA)
    return table


def _limited(rows: Iterator[dict[str, Any]], limit: int | None) -> Iterator[dict[str, Any]]:
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _files(path: Path, suffixes: set[str]) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def _read_table(file: Path, fmt: str) -> pa.Table:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        # every column as a string: a caption that looks like a number must stay text
        with open(file, "rb") as f:
            header = f.readline().decode("utf-8", "replace").strip()
        names = next(csv.reader([header]), [])
        opts = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True)
        return pacsv.read_csv(file, convert_options=opts)
    rows = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                obj = {"__error__": f"line {lineno} is not valid JSON: {e.msg}"}
            rows.append(obj if isinstance(obj, dict) else {"__error__": f"line {lineno} is not a JSON object"})
    # from_pylist takes its columns from the first row alone; a later row may add one (or be an error)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: _column([_scalar(r.get(k)) for r in rows]) for k in keys}) if rows else pa.table({})


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in one field: keep them as text
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _scalar(value: Any) -> Any:
    """Nested JSON values are kept as JSON text: a column must hold one type."""
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def _pick(columns: list[str], explicit: str | None, candidates: tuple[str, ...], file: Path, what: str) -> str | None:
    if explicit:
        if explicit not in columns:
            raise ValueError(f"{file}: column {explicit!r} (input.{what}_column) not found; columns: {columns}")
        return explicit
    return next((c for c in candidates if c in columns), None)


def _read_url_lists(path: Path, fmt: str, cfg: InputConfig) -> Iterator[dict[str, Any]]:
    suffixes = {s for s, f in URL_LIST_SUFFIXES.items() if f == fmt}
    files = _files(path, suffixes)
    if not files:
        raise ValueError(f"input.path {path}: no {fmt} URL lists found")
    for file in files:
        table = _read_table(file, fmt)
        cols = table.column_names
        url_col = _pick(cols, cfg.url_column, URL_COLUMNS, file, "url")
        if url_col is None and "__error__" not in cols:
            raise ValueError(f"{file}: no URL column; expected one of {URL_COLUMNS} (or set input.url_column)")
        cap_col = _pick(cols, cfg.caption_column, CAPTION_COLUMNS, file, "caption")
        mod_col = _pick(cols, cfg.modality_column, ("modality",), file, "modality")
        data = table.to_pydict()
        n = table.num_rows
        for i in range(n):
            url = data[url_col][i] if url_col else None
            caption = data[cap_col][i] if cap_col else None
            modality = data[mod_col][i] if mod_col else None
            source = f"{file.name}:{i}"
            error = detail = None
            if "__error__" in data and data["__error__"][i]:
                error, detail = "malformed_row", f"{file}: {data['__error__'][i]}"
            elif not isinstance(url, str) or not url.strip():
                error, detail = "missing_url", f"{file} row {i}: column {url_col!r} is empty"
            elif caption is not None and not isinstance(caption, str):
                caption = str(caption)
            if error is None and (caption is None or not str(caption).strip()):
                error, detail = "missing_caption", f"{file} row {i}: no caption"
            if modality is not None and modality not in ("image", "video", "audio"):
                if error is None:
                    error, detail = "bad_modality", f"{file} row {i}: modality {modality!r} is not image/video/audio"
                modality = None
            url_s = url.strip() if isinstance(url, str) else None
            yield {
                "uid": make_uid(file.name, str(i), url_s or ""),
                "source": source,
                "modality": modality or _default_modality(cfg, url_s),
                "url": url_s,
                "local_path": None,
                "tar_member": None,
                "caption": caption,
                "input_error": error,
                "input_detail": detail,
            }


def _default_modality(cfg: InputConfig, name: str | None) -> str:
    if cfg.default_modality != "auto":
        return cfg.default_modality
    return modality_from_name(name) or "image"


def _read_shard_folder(path: Path, cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """Samples of webdataset tars (img2dataset writes the same layout: key.jpg, key.txt, key.json)."""
    tars = sorted(path.rglob("*.tar"))
    if not tars:
        raise ValueError(f"input.path {path}: no .tar shards found")
    for tar_path in tars:
        samples: dict[str, dict[str, Any]] = {}
        order: list[str] = []
        with tarfile.open(tar_path) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                name = member.name
                base = PurePosixPath(name).name
                key, _, ext = base.partition(".")
                full_key = str(PurePosixPath(name).parent / key)
                if full_key not in samples:
                    samples[full_key] = {}
                    order.append(full_key)
                s = samples[full_key]
                ext = ext.lower()
                if ext in ("txt", "caption"):
                    s["caption"] = tf.extractfile(member).read().decode("utf-8", "replace")
                elif ext == "json":
                    try:
                        s["meta"] = json.loads(tf.extractfile(member).read())
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        s["meta"] = {}
                elif modality_from_name(base):
                    s["media"] = name
                    s["modality"] = modality_from_name(base)
        rel = str(tar_path.relative_to(path))
        for key in order:
            s = samples[key]
            meta = s.get("meta") or {}
            caption = s.get("caption") or meta.get("caption")
            error = detail = None
            if "media" not in s:
                error, detail = "missing_media", f"{tar_path}: sample {key!r} has no image, video or audio member"
            elif not caption or not str(caption).strip():
                error, detail = "missing_caption", f"{tar_path}: sample {key!r} has no .txt caption"
            yield {
                "uid": make_uid(rel, key),
                "source": f"{rel}:{key}",
                "modality": s.get("modality") or _default_modality(cfg, None),
                "url": None,
                "local_path": str(tar_path.resolve()),
                "tar_member": s.get("media"),
                "caption": caption,
                "input_error": error,
                "input_detail": detail,
                # the URL it was downloaded from, when the shard says so, is kept for lineage
                **({"source": f"{rel}:{key} ({meta['url']})"} if isinstance(meta.get("url"), str) else {}),
            }


def _read_media_folder(path: Path, cfg: InputConfig) -> Iterator[dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and modality_from_name(p.name))
    if not files:
        raise ValueError(f"input.path {path}: no media files (image, video or audio extensions) found")
    for file in files:
        rel = str(file.relative_to(path))
        caption_file = file.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace") if caption_file.is_file() else None
        error = detail = None
        if caption is None or not caption.strip():
            error, detail = "missing_caption", f"{file}: no caption file {caption_file.name} beside it"
        yield {
            "uid": make_uid(rel),
            "source": rel,
            "modality": modality_from_name(file.name),
            "url": None,
            "local_path": str(file.resolve()),
            "tar_member": None,
            "caption": caption.strip() if caption else caption,
            "input_error": error,
            "input_detail": detail,
        }
