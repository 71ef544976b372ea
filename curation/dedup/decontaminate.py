"""Decontamination: find records that duplicate an item of an evaluation set, exactly, perceptually or semantically.

The evaluation set (``dedup.decontaminate``) is one of:

- a media folder: every image, video and audio file under it (by extension);
- a list of local media files: ``.txt`` (one path a line) or ``.csv``/``.jsonl``/``.parquet`` with a ``path`` or
  ``url`` column (plain paths, relative to the list's folder, or ``file://`` URLs; nothing is downloaded: crawl a
  remote eval set with the pipeline first and pass its fingerprints);
- a reference table: parquet file(s) with any of ``sha256`` (hex), ``words`` (list<uint64>) + ``profile``
  (list<float32>) + ``duration_s``, ``embedding`` (list<float32>), and ``modality`` and ``id``/``uid``. The
  ``dedup/fingerprints/`` folder of another run is such a table.

Media are fingerprinted the same way as records (:mod:`curation.dedup.perceptual`); the same thresholds apply.
Semantic matching needs embeddings on both sides (the reference table's and the score stage's): an item of a media
folder has none, because embedding it needs the score stage's encoder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("modality", pa.string()),
        ("sha256", pa.string()),
        ("words", pa.list_(pa.uint64())),
        ("profile", pa.list_(pa.float32())),
        ("duration_s", pa.float64()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
_TABLE_COLUMNS = {"sha256", "words", "embedding"}


def _media_rows(files: list[tuple[str, Path, str | None]], video_frames: int) -> list[dict]:
    """Reference rows for media files given as (id, path, modality or None)."""
    from curation.crawl.probe import probe_media
    from curation.dedup.perceptual import FingerprintError, fingerprint
    from curation.inputs import modality_from_name

    rows = []
    for ref_id, path, modality in files:
        modality = modality or modality_from_name(path.name)
        if modality is None:
            raise ValueError(f"decontaminate: cannot tell the modality of {path} from its name")
        data = path.read_bytes()
        row = {"id": ref_id, "modality": modality, "sha256": hashlib.sha256(data).hexdigest()}
        probe = probe_media(data, modality)
        row["duration_s"] = probe.to_dict().get("duration_s") if probe.ok else None
        try:
            fp = fingerprint(data, modality, video_frames)
            row["words"], row["profile"] = fp.words.tolist(), fp.profile.tolist()
        except FingerprintError:
            pass  # still matched exactly by sha256
        rows.append(row)
    return rows


def _list_entries(path: Path) -> list[tuple[str, Path, str | None]]:
    if path.suffix.lower() == ".txt":
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        items = [{"path": ln} for ln in lines if ln and not ln.startswith("#")]
    elif path.suffix.lower() == ".jsonl":
        items = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    elif path.suffix.lower() == ".csv":
        import pyarrow.csv as pacsv

        items = pacsv.read_csv(path).to_pylist()
    else:
        items = pq.read_table(path).to_pylist()
    out = []
    for i, item in enumerate(items):
        where = item.get("path") or item.get("url")
        if not isinstance(where, str):
            raise ValueError(f"decontaminate: {path} row {i} has no path or url")
        if "://" in where and not where.startswith("file://"):
            raise ValueError(f"decontaminate: {path} row {i}: {where} is not a local file (nothing is downloaded)")
        local = Path(where.removeprefix("file://")).expanduser()
        local = local if local.is_absolute() else path.parent / local
        out.append((str(item.get("id") or where), local, item.get("modality")))
    return out


def _normalise_table(table: pa.Table) -> pa.Table:
    cols = {}
    n = table.num_rows
    ids = (
        table.column("id")
        if "id" in table.column_names
        else table.column("uid")
        if "uid" in table.column_names
        else None
    )
    cols["id"] = pa.array([str(x) for x in ids.to_pylist()] if ids is not None else [str(i) for i in range(n)])
    for field in REFERENCE_SCHEMA:
        if field.name == "id":
            continue
        cols[field.name] = table.column(field.name).cast(field.type) if field.name in table.column_names else (
            pa.nulls(n, field.type))  # fmt: skip
    return pa.table(cols, schema=REFERENCE_SCHEMA)


def load_reference(path: str | Path, video_frames: int = 8) -> pa.Table:
    """The evaluation set as a table of :data:`REFERENCE_SCHEMA` (see the module notes for what ``path`` may be)."""
    from curation.inputs import modality_from_name

    path = Path(path).expanduser()
    if path.is_dir():
        tables = sorted(path.glob("*.parquet"))
        if tables:
            table = pa.concat_tables([pq.read_table(t) for t in tables], promote_options="default")
            if _TABLE_COLUMNS & set(table.column_names):
                return _normalise_table(table)
        files = sorted(p for p in path.rglob("*") if p.is_file() and modality_from_name(p.name))
        if not files:
            raise ValueError(f"decontaminate: {path} holds no media files and no reference parquet")
        rows = _media_rows([(str(p.relative_to(path)), p, None) for p in files], video_frames)
    elif path.suffix.lower() == ".parquet" and _TABLE_COLUMNS & set(pq.read_schema(path).names):
        return _normalise_table(pq.read_table(path))
    else:
        rows = _media_rows(_list_entries(path), video_frames)
    return pa.Table.from_pylist(rows, schema=REFERENCE_SCHEMA)


def find_contaminated(
    sha256: np.ndarray,
    modality: np.ndarray,
    fingerprints: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    embeddings: dict[str, tuple[np.ndarray, np.ndarray]],
    reference: pa.Table,
    thresholds: dict,
    semantic_eps: float | None,
) -> dict[int, tuple[str, str, float]]:
    """Records that match an evaluation item: position -> (item id, ``exact``/``perceptual``/``semantic``,
    distance). An exact match wins over a perceptual one, which wins over a semantic one.

    ``fingerprints``: modality -> (positions, words, profiles, durations) of the records (as the dedup stage
    builds them); ``embeddings``: modality -> (positions, normalised embeddings); ``thresholds``: modality ->
    :class:`~curation.dedup.perceptual.Thresholds`; ``semantic_eps``: ``None`` skips semantic matching.
    """
    from curation.dedup.perceptual import near_duplicates

    hits: dict[int, tuple[str, str, float]] = {}
    ids = reference.column("id").to_pylist()
    ref_sha = {}
    for rid, sha in zip(ids, reference.column("sha256").to_pylist()):
        if sha:
            ref_sha.setdefault(sha, rid)
    for i, sha in enumerate(sha256.tolist()):
        if sha in ref_sha:
            hits[i] = (ref_sha[sha], "exact", 0.0)
    ref_mod = np.asarray(reference.column("modality").to_pylist(), dtype=object)
    ref_words = reference.column("words").to_pylist()
    ref_prof = reference.column("profile").to_pylist()
    ref_dur = np.asarray(reference.column("duration_s").to_pylist(), dtype=np.float64)
    for m, (pos, words, profiles, durations) in fingerprints.items():
        if not len(pos):
            continue
        rows = [k for k in range(len(ids)) if ref_mod[k] == m and ref_words[k] is not None
                and len(ref_words[k]) == words.shape[1] and len(ref_prof[k] or ()) == profiles.shape[1]]  # fmt: skip
        if not rows:
            continue
        rw = np.asarray([ref_words[k] for k in rows], dtype=np.uint64)
        rp = np.asarray([ref_prof[k] for k in rows], dtype=np.float32)
        pairs, bits, _ = near_duplicates(rw, rp, ref_dur[rows], thresholds[m], queries=(words, profiles, durations))
        for (q, r), b in sorted(zip(pairs.tolist(), bits.tolist()), key=lambda t: t[1]):
            hits.setdefault(int(pos[q]), (ids[rows[r]], "perceptual", float(b)))
    if semantic_eps is not None and "embedding" in reference.column_names:
        ref_emb = reference.column("embedding").to_pylist()
        for m, (pos, x) in embeddings.items():
            rows = [k for k in range(len(ids)) if ref_mod[k] == m and ref_emb[k] is not None
                    and len(ref_emb[k]) == x.shape[1]]  # fmt: skip
            if not rows or not len(pos):
                continue
            ref_x = np.asarray([ref_emb[k] for k in rows], dtype=np.float32)
            ref_x /= np.maximum(np.linalg.norm(ref_x, axis=1, keepdims=True), 1e-12)
            best, best_at = _max_cosine(x, ref_x)
            for q in np.flatnonzero(best > 1.0 - semantic_eps).tolist():
                hits.setdefault(int(pos[q]), (ids[rows[int(best_at[q])]], "semantic", float(1.0 - best[q])))
    return hits


def _max_cosine(x: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``x``, the largest cosine similarity to a row of ``ref`` and its index (faiss, exact)."""
    import faiss

    index = faiss.IndexFlatIP(ref.shape[1])
    index.add(np.ascontiguousarray(ref, dtype=np.float32))
    sims, at = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return sims[:, 0], at[:, 0]
