"""Dedup: drop records that leak an evaluation set, then duplicates at every level (curation/dedup/).

Per crawl shard, one Ray Data task fingerprints every record (perceptual hash and profile, normalised-caption sha256
and MinHash signature) into ``dedup/fingerprints/<shard>.parquet``, with a ``dedup/done/<shard>.json`` marker, so a
killed run resumes without redoing finished shards. Then, over all records the earlier stages kept, in input
order, each level runs over what the ones before kept:

    contaminated           exact, perceptual or semantic match with an item of ``dedup.decontaminate``
    duplicate_exact        equal media bytes (sha256), grouped over Ray Data
    duplicate_perceptual   near-equal perceptual fingerprint, per modality
    duplicate_semantic     SemDeDup over the score stage's embeddings, per modality (when they exist)
    duplicate_caption      near-identical caption (MinHash LSH), within ``dedup.caption_scope``

Outputs: ``dedup/ledger/<shard>.parquet`` for every record given (kept, or rejected with ``dup_of``) and
``dedup/duplicates.parquet`` (every reject with its level, partner and distance, for reports).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import DedupConfig
from curation.fsutil import atomic_path
from curation.ledger import kept_row, rejected_row, write_part
from curation.stages.base import Stage, log, map_shards

FINGERPRINT_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("modality", pa.string()),
        ("sha256", pa.string()),
        ("duration_s", pa.float64()),
        ("words", pa.list_(pa.uint64())),  # perceptual hash words; null when the media could not be decoded
        ("profile", pa.list_(pa.float32())),  # confirmation profile (thumbnail, audio texture)
        ("fingerprint_error", pa.string()),
        ("caption_sha256", pa.string()),
        ("caption_words", pa.int32()),
        ("minhash", pa.list_(pa.uint32())),  # null unless the caption method runs
    ]
)
DUPLICATES_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("modality", pa.string()),
        ("reason", pa.string()),
        ("dup_of", pa.string()),
        ("distance", pa.float64()),  # bits, 1 - cosine or 1 - Jaccard, by level
        ("detail", pa.string()),
    ]
)
REASONS = ("contaminated", "duplicate_exact", "duplicate_perceptual", "duplicate_semantic", "duplicate_caption")
FINGERPRINT_VERSION = 1


def fingerprint_settings(cfg: DedupConfig) -> str:
    """What the per-shard fingerprints depend on; a marker with other settings is redone, not trusted."""
    data = {
        "version": FINGERPRINT_VERSION,
        "video_frames": cfg.video_frames,
        "minhash": [cfg.caption_ngram, cfg.caption_bands, cfg.caption_rows] if "caption" in cfg.methods else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def minhash_params(cfg: DedupConfig):
    from curation.dedup.minhash import MinHashParams

    return MinHashParams(cfg.caption_ngram, cfg.caption_bands, cfg.caption_rows)


def thresholds(cfg: DedupConfig, modality: str, slack: float = 0.0):
    from curation.dedup.perceptual import Thresholds

    bits = getattr(cfg, f"{modality}_max_bits") + slack
    profile = {"image": cfg.image_max_color_diff, "video": cfg.video_max_color_diff,
               "audio": cfg.audio_max_texture_diff}[modality]  # fmt: skip
    duration = cfg.max_duration_diff_s if modality in ("video", "audio") else None
    return Thresholds(min(bits, 63.0), profile, duration, cfg.bands)


def fingerprint_records(records: list[dict[str, Any]], media: dict[str, bytes], cfg: DedupConfig) -> pa.Table:
    """The fingerprint rows of some crawled records (their media in ``media``)."""
    from curation.dedup.exact import caption_sha256, normalize_captions
    from curation.dedup.minhash import signatures
    from curation.dedup.perceptual import FingerprintError, fingerprint

    captions = [r["caption"] for r in records]
    sigs = signatures(captions, minhash_params(cfg)) if "caption" in cfg.methods else None
    rows = []
    for i, (rec, cap_key, norm) in enumerate(zip(records, caption_sha256(captions), normalize_captions(captions))):
        words = profile = error = None
        try:
            fp = fingerprint(media[rec["uid"]], rec["modality"], cfg.video_frames, rec.get("num_frames"))
            words, profile = fp.words.tolist(), fp.profile.tolist()
        except FingerprintError as e:
            error = str(e)
        except KeyError:
            error = "media missing from the crawl shard"
        rows.append(
            {
                "uid": rec["uid"],
                "modality": rec["modality"],
                "sha256": rec["sha256"],
                "duration_s": rec.get("duration_s"),
                "words": words,
                "profile": profile,
                "fingerprint_error": error,
                "caption_sha256": cap_key,
                "caption_words": len(norm.split()),
                "minhash": None if sigs is None else sigs[i].tolist(),
            }
        )
    return pa.Table.from_pylist(rows, schema=FINGERPRINT_SCHEMA)


def _fingerprint_task(shard: str, stage: DedupStage) -> dict[str, Any]:
    """One Ray task of :func:`map_shards`: fingerprint a crawl shard and mark it done."""
    started = time.time()
    records = pq.read_table(stage.ctx.run_dir / "crawl" / "shards" / f"{shard}.parquet").to_pylist()
    table = fingerprint_records(records, stage.read_media(shard), stage.config.dedup)
    with atomic_path(stage.fingerprint_path(shard)) as tmp:
        pq.write_table(table, tmp)
    summary = {
        "records": table.num_rows,
        "unfingerprinted": table.num_rows - table.column("fingerprint_error").null_count,
        "settings": fingerprint_settings(stage.config.dedup),
        "seconds": round(time.time() - started, 3),
    }
    stage.mark_shard_done(shard, summary)
    return {**summary, "shard": shard}


class _Decisions:
    """Who is still in, and why the others went: one slot per record in input order."""

    def __init__(self, uids: list[str], modality: np.ndarray):
        self.uids = uids
        self.modality = modality
        self.alive = np.ones(len(uids), dtype=bool)
        self.reason: list[str | None] = [None] * len(uids)
        self.dup_of: list[str | None] = [None] * len(uids)
        self.detail: list[str | None] = [None] * len(uids)
        self.distance = np.full(len(uids), np.nan)

    def reject(self, i: int, reason: str, dup_of: str, distance: float, detail: str) -> None:
        self.alive[i] = False
        self.reason[i], self.dup_of[i], self.distance[i], self.detail[i] = reason, dup_of, distance, detail

    def apply(self, idx: np.ndarray, dup_local: np.ndarray, dist: np.ndarray, reason: str, describe) -> int:
        """Reject ``idx[k]`` as a duplicate of ``idx[dup_local[k]]`` where ``dup_local[k] >= 0``."""
        hits = np.flatnonzero(dup_local >= 0)
        for k in hits.tolist():
            i, j = int(idx[k]), int(idx[dup_local[k]])
            self.reject(i, reason, self.uids[j], float(dist[k]), describe(self.uids[j], float(dist[k])))
        return len(hits)


class DedupStage(Stage):
    """Decontaminate, then remove exact, perceptual, semantic and caption duplicates."""

    name = "dedup"
    order = 30
    config_sections = ("dedup",)
    help = "drop eval-set leaks and exact, perceptual, semantic and caption duplicates"

    def fingerprint_path(self, shard: str) -> Path:
        return self.dir / "fingerprints" / f"{shard}.parquet"

    def _shard_current(self, shard: str) -> bool:
        if not self.is_shard_done(shard) or not self.fingerprint_path(shard).is_file():
            return False
        return json.loads(self.done_path(shard).read_text()).get("settings") == fingerprint_settings(self.config.dedup)

    def fingerprint_shards(self, shards: list[str]) -> None:
        cfg = self.config.dedup
        pending = [s for s in shards if not self._shard_current(s)]
        log.info("dedup: fingerprints for %d shards, %d already complete", len(shards), len(shards) - len(pending))
        items = [{"shard": s} for s in pending]
        summaries = map_shards(_fingerprint_task, items, cfg.num_cpus, cfg.parallelism, stage=self)
        for done, s in enumerate(summaries, 1):
            log.info("dedup: fingerprinted shard %s (%d/%d): %d records in %.1f s", s["shard"], done, len(pending),
                     s["records"], s["seconds"])  # fmt: skip

    def run(self, input_stage: str = "crawl") -> dict[str, Any]:
        cfg = self.config.dedup
        started = time.time()
        kept = self.kept_records(columns=["uid", "modality", "shard"])  # the tasks read their shards
        shards = [s for s, t in kept.items() if t.num_rows]
        self.fingerprint_shards(shards)
        # every kept record in input order (crawl shards are in input order, and so are their rows)
        records = pa.concat_tables(list(kept.values())) if kept else None
        if records is None or records.num_rows == 0:
            for shard in sorted((self.ctx.run_dir / "crawl" / "shards").glob("*.parquet")):
                write_part(self.ledger_path(shard.stem), [])
            return {"input": 0, "kept": 0, "rejected": 0, "reasons": {}}
        fps = pa.concat_tables([pq.read_table(self.fingerprint_path(s)) for s in shards])
        position = {u: i for i, u in enumerate(fps.column("uid").to_pylist())}
        uids = records.column("uid").to_pylist()
        fps = fps.take(pa.array([position[u] for u in uids]))  # aligned with `records`
        d = _Decisions(uids, np.asarray(records.column("modality").to_pylist()))
        timings: dict[str, float] = {}
        notes: list[str] = []

        def timed(name: str, fn, *args) -> Any:
            t0 = time.time()
            out = fn(*args)
            timings[name] = round(time.time() - t0, 3)
            return out

        embeddings = timed("load_embeddings", self._embeddings, d, notes) if self._wants_embeddings() else None
        if cfg.decontaminate:
            timed("decontaminate", self._decontaminate, d, fps, embeddings)
        if "exact" in cfg.methods:
            timed("exact", self._exact, d, fps)
        if "perceptual" in cfg.methods:
            timed("perceptual", self._perceptual, d, fps)
        if "semantic" in cfg.methods and embeddings is not None:
            timed("semantic", self._semantic, d, embeddings)
        if "caption" in cfg.methods:
            timed("caption", self._caption, d, fps)
        for note in notes:
            log.info("dedup: %s", note)
        self._write_outputs(d, records)
        reasons = Counter(r for r in d.reason if r)
        by_modality = {
            m: {"input": int((d.modality == m).sum()), "rejected": int(((d.modality == m) & ~d.alive).sum())}
            for m in sorted(set(d.modality.tolist()))
        }
        return {
            "input": len(uids),
            "kept": int(d.alive.sum()),
            "rejected": int((~d.alive).sum()),
            "reasons": dict(sorted(reasons.items())),
            **{r: reasons.get(r, 0) for r in REASONS},
            "by_modality": by_modality,
            "unfingerprinted": int(pc.sum(pc.is_valid(fps.column("fingerprint_error"))).as_py() or 0),
            "notes": notes,
            "timings": timings,
            "seconds": round(time.time() - started, 3),
        }

    # -- levels --------------------------------------------------------------------------------------------------
    def _exact(self, d: _Decisions, fps: pa.Table) -> None:
        from curation.dedup.exact import first_copies_ray

        idx = np.flatnonzero(d.alive)
        keys = np.asarray(fps.column("sha256").to_pylist(), dtype=object)[idx]  # input order: first copy stays
        dup = first_copies_ray(list(keys), self.config.dedup.parallelism)
        n = d.apply(idx, dup, np.zeros(len(idx)), "duplicate_exact", lambda uid, _: f"same media bytes as {uid}")
        log.info("dedup: exact: %d duplicates", n)

    def _perceptual(self, d: _Decisions, fps: pa.Table) -> None:
        from curation.dedup.groups import keep_first
        from curation.dedup.perceptual import near_duplicates

        for modality in ("image", "video", "audio"):
            idx, words, profiles, durations = _fingerprints_of(d, fps, modality)
            if len(idx) < 2:
                continue
            th = thresholds(self.config.dedup, modality)
            pairs, bits, prof = near_duplicates(words, profiles, durations, th)
            # rank by the profile distance (finer than bits); keep-first decides who stays
            dup, _ = keep_first(len(idx), pairs, prof + bits / 64.0)
            found = {(int(a), int(b)): (nb, npf) for (a, b), nb, npf in zip(pairs.tolist(), bits, prof)}  # a < b
            dist = np.full(len(idx), np.nan)
            for k in np.flatnonzero(dup >= 0).tolist():
                dist[k] = found[(min(k, int(dup[k])), max(k, int(dup[k])))][0]
            kind = "thumbnail colour" if modality != "audio" else "texture"

            def describe(uid: str, nbits: float, _kind=kind) -> str:
                return f"perceptual near-duplicate of {uid}: {nbits:g} hash bits apart, {_kind} confirmed"

            n = d.apply(idx, dup, dist, "duplicate_perceptual", describe)
            log.info("dedup: perceptual %s: %d near-duplicates among %d", modality, n, len(idx))

    def _wants_embeddings(self) -> bool:
        # decontamination matches embeddings only when the semantic level is on (same eps)
        return "semantic" in self.config.dedup.methods

    def _embeddings(self, d: _Decisions, notes: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        """modality -> (record positions, (n, dim) float32 normalised) from ``score/embeddings/``, or None."""
        folder = self.ctx.run_dir / "score" / "embeddings"
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            notes.append(f"semantic dedup skipped: no embeddings in {folder} (the score stage writes them)")
            return None
        table = pa.concat_tables([pq.read_table(f, columns=["uid", "modality", "embedding"]) for f in files])
        position = {u: i for i, u in enumerate(d.uids)}
        out = {}
        table = table.filter(pc.is_valid(table.column("embedding")))  # a record the scorer could not embed
        uids = table.column("uid").to_pylist()
        mods = table.column("modality").to_pylist()
        for modality in ("image", "video", "audio"):
            rows = [k for k, (u, m) in enumerate(zip(uids, mods)) if m == modality and u in position]
            if not rows:
                continue
            emb = table.column("embedding").take(pa.array(rows))
            x = np.array(emb.combine_chunks().flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
            x = x.reshape(len(rows), -1)
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # the contract says normalised; cheap
            idx = np.array([position[uids[k]] for k in rows], dtype=np.int64)
            order = np.argsort(idx)  # input order
            out[modality] = (idx[order], x[order])
        missing = len(d.uids) - sum(len(v[0]) for v in out.values())
        if missing:
            notes.append(f"semantic dedup: {missing} records have no embedding and take no part")
        return out

    def _semantic(self, d: _Decisions, embeddings: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        from curation.dedup.semantic import semantic_dedup

        cfg = self.config.dedup
        for modality, (idx_all, x_all) in embeddings.items():
            live = d.alive[idx_all]
            idx, x = idx_all[live], x_all[live]
            if len(idx) < 2:
                continue
            res = semantic_dedup(x, cfg.semantic_eps, cfg.semantic_keep, cfg.semantic_clusters, cfg.seed,
                                 cfg.semantic_iterations, cfg.semantic_max_points_per_centroid)  # fmt: skip

            def describe(uid: str, dist: float) -> str:
                return f"semantic duplicate in the group kept as {uid}: cosine {1 - dist:.4f} > 1 - {cfg.semantic_eps}"

            n = d.apply(idx, res.dup_of, 1.0 - res.similarity, "duplicate_semantic", describe)
            log.info("dedup: semantic %s: %d duplicates among %d (%d clusters)", modality, n, len(idx), res.clusters)

    def _caption(self, d: _Decisions, fps: pa.Table) -> None:
        from curation.dedup.exact import first_copies
        from curation.dedup.groups import keep_first
        from curation.dedup.minhash import near_duplicate_pairs, similarity

        cfg = self.config.dedup
        params = minhash_params(cfg)
        words_count = np.asarray(fps.column("caption_words").to_pylist())
        for modality in ("image", "video", "audio"):
            idx = np.flatnonzero(d.alive & (d.modality == modality))
            if cfg.caption_scope == "global":
                idx = idx[words_count[idx] >= cfg.caption_min_words]
            if len(idx) < 2:
                continue
            sig = _list_column(fps.column("minhash").take(pa.array(idx)), np.uint32)
            pairs, sim = near_duplicate_pairs(sig, params, cfg.caption_threshold)
            # equal normalised captions are pairs even if LSH missed them (it cannot, but this is free)
            keys = np.asarray(fps.column("caption_sha256").to_pylist(), dtype=object)[idx]
            same = first_copies(list(keys))
            extra = np.stack([same[same >= 0], np.flatnonzero(same >= 0)], axis=1) if (same >= 0).any() else None
            if extra is not None:
                pairs = np.unique(np.sort(np.concatenate([pairs, extra]), axis=1), axis=0)
                sim = similarity(sig, pairs[:, 0], pairs[:, 1])
            if cfg.caption_scope == "media" and len(pairs):
                pairs, sim = self._media_confirmed(d, fps, idx, modality, pairs, sim)
            dup, dist = keep_first(len(idx), pairs, 1.0 - sim)

            def describe(uid: str, dist: float) -> str:
                scope = "; media near-duplicate too" if cfg.caption_scope == "media" else ""
                return f"caption near-duplicate of {uid}: Jaccard ~{1 - dist:.2f}{scope}"

            n = d.apply(idx, dup, dist, "duplicate_caption", describe)
            log.info("dedup: caption %s: %d duplicates among %d (%s scope)", modality, n, len(idx), cfg.caption_scope)

    def _media_confirmed(self, d, fps, idx, modality, pairs, sim):
        """The caption pairs whose media are near-duplicates too, with ``caption_bits_slack`` more bits allowed."""
        from curation.dedup.perceptual import hamming

        pos, words, profiles, durations = _fingerprints_of(d, fps, modality)
        row = {int(p): k for k, p in enumerate(pos)}
        a = np.array([row.get(int(idx[i]), -1) for i in pairs[:, 0]], dtype=np.int64)
        b = np.array([row.get(int(idx[i]), -1) for i in pairs[:, 1]], dtype=np.int64)
        has = (a >= 0) & (b >= 0)  # a record without a fingerprint has no media evidence
        pairs, sim, a, b = pairs[has], sim[has], a[has], b[has]
        th = thresholds(self.config.dedup, modality, self.config.dedup.caption_bits_slack)
        ok = (hamming(words[a], words[b]) <= th.max_bits) & (np.abs(profiles[a] - profiles[b]).mean(axis=1)
                                                             <= th.max_profile)  # fmt: skip
        if th.max_duration_s is not None:
            ok &= ~(np.abs(durations[a] - durations[b]) > th.max_duration_s)
        return pairs[ok], sim[ok]

    def _decontaminate(self, d: _Decisions, fps: pa.Table, embeddings) -> None:
        from curation.dedup.decontaminate import find_contaminated, load_reference

        cfg = self.config.dedup
        ref = load_reference(Path(cfg.decontaminate).expanduser(), cfg.video_frames)
        hits = find_contaminated(
            sha256=np.asarray(fps.column("sha256").to_pylist(), dtype=object),
            modality=d.modality,
            fingerprints={m: _fingerprints_of(d, fps, m) for m in ("image", "video", "audio")},
            embeddings=embeddings or {},
            reference=ref,
            thresholds={m: thresholds(cfg, m) for m in ("image", "video", "audio")},
            semantic_eps=cfg.semantic_eps if "semantic" in cfg.methods else None,
        )
        for i, (ref_id, how, dist) in sorted(hits.items()):
            d.reject(i, "contaminated", f"eval:{ref_id}", dist, f"{how} match with evaluation item {ref_id}")
        log.info("dedup: decontaminate: %d records match %d evaluation items of %s", len(hits), ref.num_rows,
                 cfg.decontaminate)  # fmt: skip

    # -- outputs -------------------------------------------------------------------------------------------------
    def _write_outputs(self, d: _Decisions, records: pa.Table) -> None:
        shards = records.column("shard").to_pylist()
        by_shard: dict[str, list[dict[str, Any]]] = {}
        dups = []
        for i, uid in enumerate(d.uids):
            if d.alive[i]:
                row = kept_row(uid, "dedup")
            else:
                row = rejected_row(uid, "dedup", d.reason[i], d.detail[i], dup_of=d.dup_of[i])
                dist = None if np.isnan(d.distance[i]) else float(d.distance[i])
                dups.append({"uid": uid, "modality": str(d.modality[i]), "reason": d.reason[i],
                             "dup_of": d.dup_of[i], "distance": dist, "detail": d.detail[i]})  # fmt: skip
            by_shard.setdefault(shards[i], []).append(row)
        with atomic_path(self.dir / "duplicates.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(dups, schema=DUPLICATES_SCHEMA), tmp)
        for shard in sorted((self.ctx.run_dir / "crawl" / "shards").glob("*.parquet")):
            write_part(self.ledger_path(shard.stem), by_shard.get(shard.stem, []))


def _fingerprints_of(d: _Decisions, fps: pa.Table, modality: str):
    """(positions, words (n, L) uint64, profiles (n, P) float32, durations (n,)) of the live records of one
    modality that have a fingerprint."""
    has = pc.is_valid(fps.column("words")).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(d.alive & (d.modality == modality) & has)
    if not len(idx):
        return idx, np.empty((0, 1), np.uint64), np.empty((0, 1), np.float32), np.empty(0)
    words = fps.column("words").take(pa.array(idx))
    # a video that decoded fewer frames than asked for cannot be stacked with the rest: leave it out
    lengths = pc.list_value_length(words).to_numpy(zero_copy_only=False)
    idx = idx[lengths == lengths.max()]
    take = pa.array(idx)
    words = _list_column(fps.column("words").take(take), np.uint64)
    profiles = _list_column(fps.column("profile").take(take), np.float32)
    durations = np.asarray(fps.column("duration_s").take(take).to_pylist(), dtype=np.float64)
    return idx, words, profiles, durations


def _list_column(column: pa.ChunkedArray, dtype) -> np.ndarray:
    """An all-valid list column of equal-length lists as an (n, length) array, without Python objects."""
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=dtype).reshape(len(column), -1)
