"""Planning and writing the webdataset shards of a release.

The plan is made once, from metadata alone, in two steps: every kept record's ``.json`` member is rendered, a crawl
shard at a time in any order (:func:`render_samples`, in Ray tasks when there are many); then, on the driver,
every sample is assigned its shard in a fixed order, crawl shard by crawl shard, then record order
(:func:`assign_shards`). Samples are grouped into
shard *series* by modality and file type (``image-jpg-000000.tar``, ``audio-wav-000000.tar``), because readers
that infer one schema per dataset (HF datasets' webdataset loader) need every sample of a shard to have the same
members. A series' shard is closed at ``max_shard_samples`` or ``max_shard_bytes``, whichever comes first.

Each shard is then written by one task from its plan rows and the crawl shards' media, with a fixed member
mtime, so the same run always gives the same bytes, whichever task writes a shard and whenever.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from curation.fsutil import atomic_path, tar_index
from curation.ledger import kept_row, rejected_row, write_part
from curation.schemas import MEDIA_METADATA, RECORD_SCHEMA

TAR_BLOCK = 512
PLAN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),  # the release shard, without .tar
        ("crawl_shard", pa.string()),
        ("modality", pa.string()),
        ("ext", pa.string()),
        ("sha256", pa.string()),
        ("num_bytes", pa.int64()),
        ("caption", pa.string()),
        ("generator", pa.string()),
        ("sample_json", pa.binary()),  # the .json member, as written
    ]
)
# the crawled record's provenance and media metadata, carried into every index row
RECORD_KEYS_FOR_INDEX = ("source", "url", *MEDIA_METADATA)
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("modality", pa.string()),
        ("ext", pa.string()),
        ("caption", pa.string()),
        ("generator", pa.string()),
        ("offset", pa.int64()),  # byte range of the whole sample (all its members) in the shard
        ("size", pa.int64()),
        ("media_offset", pa.int64()),  # byte range of the media file's data: one range request fetches it
        ("media_size", pa.int64()),
        ("sha256", pa.string()),
        *(RECORD_SCHEMA.field(k) for k in RECORD_KEYS_FOR_INDEX),
    ]
)


def padded(size: int) -> int:
    """Bytes a member of ``size`` takes in a ustar archive (header block + data rounded up to blocks)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def dumps(obj: Any) -> bytes:
    """The one JSON encoding of a release: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def build_sample(record: dict[str, Any], formatted: dict[str, Any], scores: dict[str, Any] | None) -> dict[str, Any]:
    """The ``.json`` member of a release sample (schemas/instruction_sample.schema.json)."""
    uid, modality = record["uid"], record["modality"]
    sample: dict[str, Any] = {
        "id": uid,
        modality: f"{uid}.{record['ext']}",
        "conversations": formatted["conversations"],
        "pretrain_conversations": formatted["pretrain_conversations"],
        "generator": formatted["generator"],
        "record": record,
    }
    if scores:
        sample["scores"] = scores
    if formatted.get("input_ids") is not None:
        sample["tokens"] = {k: formatted[k] for k in ("input_ids", "labels", "pretrain_input_ids", "pretrain_labels")}
    return sample


@dataclass
class ShardPlan:
    """What one release shard will hold: which crawl shards feed it, how many samples, and a hash of its plan
    rows (a finished shard from an earlier attempt is reused only when the hash matches)."""

    name: str
    crawl_shards: list[str] = field(default_factory=list)
    samples: int = 0
    bytes: int = 0
    hasher: Any = field(default_factory=hashlib.sha256, repr=False)

    @property
    def plan_hash(self) -> str:
        return self.hasher.hexdigest()


RENDERED_SCHEMA = pa.schema([f for f in PLAN_SCHEMA if f.name != "shard"])


def render_samples(
    crawl_shard: str, records: pa.Table, formatted_path: Path, scores: pa.Table | None = None
) -> pa.Table:
    """The plan rows of one crawl shard's kept ``records``, less their release shard (:data:`RENDERED_SCHEMA`):
    each sample's ``.json`` member rendered from its formatted sample and its ``scores`` (a table of ``uid`` and
    score columns). This is the per-record part of planning, done a crawl shard at a time, in any order.

    Raises RuntimeError when a kept record has no formatted sample (the format stage keeps or rejects every record
    it is given, so that is a bug)."""
    formatted = {r["uid"]: r for r in pq.read_table(formatted_path).to_pylist()} if formatted_path.is_file() else {}
    by_uid = {row.pop("uid"): row for row in scores.to_pylist()} if scores is not None else {}
    rows = []
    for record in records.to_pylist():
        f = formatted.get(record["uid"])
        if f is None:
            raise RuntimeError(f"release: kept record {record['uid']} has no formatted sample in {formatted_path}")
        rows.append(
            {
                "key": record["uid"],
                "crawl_shard": crawl_shard,
                "modality": record["modality"],
                "ext": record["ext"],
                "sha256": record["sha256"],
                "num_bytes": record["num_bytes"],
                "caption": record["caption"],
                "generator": f["generator"],
                "sample_json": dumps(build_sample(record, f, by_uid.get(record["uid"]))),
            }
        )
    return pa.Table.from_pylist(rows, schema=RENDERED_SCHEMA)


def assign_shards(
    rendered: Iterable[tuple[str, pa.Table]], plan_dir: Path, max_samples: int, max_bytes: int
) -> dict[str, ShardPlan]:
    """Assign every rendered sample to a release shard, in order (crawl shard by crawl shard, as given, then
    record order), and write the plan rows, one parquet per crawl shard. Returns the shard plans by name,
    sorted."""
    shards: dict[str, ShardPlan] = {}
    open_shard: dict[str, ShardPlan] = {}  # series -> the shard being filled
    series_count: Counter = Counter()
    for crawl_shard, table in rendered:
        columns = ("key", "sha256", "sample_json", "modality", "ext", "num_bytes", "caption")
        assigned = []
        for key, sha, sample_json, modality, ext, num_bytes, caption in zip(*(table[c].to_pylist() for c in columns)):
            size = padded(num_bytes) + padded(len(sample_json)) + padded(len(caption.encode("utf-8")))
            series = f"{modality}-{ext}"
            current = open_shard.get(series)
            # a sample larger than max_bytes still gets a shard of its own
            if current is None or current.samples >= max_samples or current.bytes + size > max_bytes:
                current = ShardPlan(f"{series}-{series_count[series]:06d}")
                series_count[series] += 1
                open_shard[series] = shards[current.name] = current
            current.samples += 1
            current.bytes += size
            if crawl_shard not in current.crawl_shards:
                current.crawl_shards.append(crawl_shard)
            current.hasher.update(key.encode() + sha.encode() + sample_json + b"\x00")
            assigned.append(current.name)
        plan = table.add_column(1, PLAN_SCHEMA.field("shard"), pa.array(assigned, pa.string()))
        with atomic_path(plan_dir / f"{crawl_shard}.parquet") as tmp:
            pq.write_table(plan, tmp)
    return dict(sorted(shards.items()))


def plan_release(
    records: dict[str, pa.Table],
    formatted_dir: Path,
    scores: dict[str, pa.Table],
    plan_dir: Path,
    max_samples: int,
    max_bytes: int,
) -> dict[str, ShardPlan]:
    """Plan the release in this process: :func:`render_samples` for each crawl shard's kept records (``scores``:
    by crawl shard), then :func:`assign_shards`. The release stage renders the crawl shards in Ray tasks
    instead when there are many."""
    rendered = (
        (shard, render_samples(shard, table, formatted_dir / f"{shard}.parquet", scores.get(shard)))
        for shard, table in sorted(records.items())
    )
    return assign_shards(rendered, plan_dir, max_samples, max_bytes)


def read_plan(plan_dir: Path, crawl_shards: list[str], shard: str | None = None) -> list[dict[str, Any]]:
    """Plan rows of ``crawl_shards`` in release order; only those of ``shard`` when given."""
    rows = []
    for crawl_shard in crawl_shards:
        # the filter drops other shards' rows in Arrow, before they become Python dicts
        filters = None if shard is None else [("shard", "=", shard)]
        rows += pq.read_table(plan_dir / f"{crawl_shard}.parquet", filters=filters).to_pylist()
    return rows


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through it."""

    def __init__(self, f):
        self.f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.f.write(data)


class WebDatasetShardWriter:
    """Writes one release shard (``<release>/<shard>.tar``) from its plan rows.

    Args:
        run_dir: the run directory (media is read from ``crawl/shards/*.tar``).
        release_dir: where the shard, its index part and its ledger part go.
        export_media: also copy each sample's media to ``exports/media/`` (for the LLaVA/sharegpt exports).
    """

    def __init__(self, run_dir: Path, release_dir: Path, export_media: bool = False):
        self.run_dir = Path(run_dir)
        self.release_dir = Path(release_dir)
        self.export_media = export_media
        self.work = self.release_dir / "_work"

    def write(self, shard: str, crawl_shards: list[str], score_columns: list[str]) -> dict[str, Any]:
        """Write the shard; returns its summary (samples, size, sha256, rejects, plan hash)."""
        import webdataset as wds

        from curation.schemas import validator
        from curation.stages.crawl import TAR_MTIME  # here: curation.stages imports this package

        check = validator("instruction_sample")
        rows = read_plan(self.work / "plan", crawl_shards, shard)
        plan_hash = hashlib.sha256()
        index, ledger, reasons = [], [], Counter()
        pos = 0
        with atomic_path(self.release_dir / f"{shard}.tar") as tmp, open(tmp, "wb") as raw:
            f = _HashingFile(raw)
            # an int mtime: a float one makes tarfile add a PAX header (1 KiB) to every member
            sink = wds.TarWriter(f, mtime=int(TAR_MTIME))
            for crawl_shard in crawl_shards:
                group = [r for r in rows if r["crawl_shard"] == crawl_shard]
                if not group:
                    continue
                tar_path = self.run_dir / "crawl" / "shards" / f"{crawl_shard}.tar"
                # tar_index reads only the headers: tarfile's TarInfo a member took 0.86 of 6.1 s of a 10,000-sample
                # shard, and TarFile.getmember scanned every member for each name before that
                in_tar = tar_index(tar_path)
                with open(tar_path, "rb") as tf:
                    for row in group:
                        key = row["key"]
                        plan_hash.update(key.encode() + row["sha256"].encode() + row["sample_json"] + b"\x00")
                        data, reason, detail = self._media(tf, in_tar, row)
                        if reason is None:
                            sample = json.loads(row["sample_json"])
                            if not check.is_valid(sample):
                                first = sorted(check.iter_errors(sample), key=lambda e: e.message)[0]
                                reason, detail = "invalid_sample", f"{key}: {first.message[:300]}"
                        if reason is not None:
                            reasons[reason] += 1
                            ledger.append(rejected_row(key, "release", reason, detail))
                            continue
                        members = {row["ext"]: data, "json": row["sample_json"], "txt": row["caption"].encode()}
                        offsets = {}
                        start = pos
                        for ext in sorted(members):  # TarWriter writes members in sorted order
                            offsets[ext] = pos + TAR_BLOCK
                            pos += padded(len(members[ext]))
                        sink.write({"__key__": key, **members})
                        if self.export_media:
                            with atomic_path(self.release_dir / "exports" / "media" / f"{key}.{row['ext']}") as m:
                                m.write_bytes(data)
                        index.append(
                            self._index_row(row, sample, shard, start, pos - start, offsets[row["ext"]], score_columns)
                        )
                        ledger.append(kept_row(key, "release"))
            if sink.tarstream.offset != pos:  # the offsets in the index would be wrong
                raise RuntimeError(f"release shard {shard}: tar offset {sink.tarstream.offset} != computed {pos}")
            sink.close()
        with atomic_path(self.work / "index" / f"{shard}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(index, schema=index_schema(score_columns)), tmp)
        write_part(self.release_dir / "ledger" / f"{shard}.parquet", ledger)
        return {
            "samples": len(index),
            "rejected": len(ledger) - len(index),
            "reasons": dict(sorted(reasons.items())),
            "size": f.size,
            "sha256": f.sha256.hexdigest(),
            "plan_hash": plan_hash.hexdigest(),
            "media_bytes": sum(r["media_size"] for r in index),
        }

    @staticmethod
    def _media(
        tf: BinaryIO, in_tar: dict[str, tuple[int, int]], row: dict[str, Any]
    ) -> tuple[bytes | None, str | None, str | None]:
        """A row's media from its open crawl tar (``in_tar``: its :func:`~curation.fsutil.tar_index`), checked
        against the planned sha256."""
        name = f"{row['key']}.{row['ext']}"
        if name not in in_tar:
            return None, "media_missing", f"crawl shard {row['crawl_shard']}.tar has no member {name}"
        offset, size = in_tar[name]
        tf.seek(offset)
        data = tf.read(size)
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            return (
                None,
                "checksum_mismatch",
                f"{name} in crawl shard {row['crawl_shard']}.tar: sha256 {digest} != {row['sha256']}",
            )
        return data, None, None

    @staticmethod
    def _index_row(
        row: dict[str, Any],
        sample: dict[str, Any],
        shard: str,
        offset: int,
        size: int,
        media_offset: int,
        score_columns: list[str],
    ) -> dict[str, Any]:
        scores = sample.get("scores") or {}
        return {
            "key": row["key"],
            "shard": f"{shard}.tar",
            "modality": row["modality"],
            "ext": row["ext"],
            "caption": row["caption"],
            "generator": row["generator"],
            "offset": offset,
            "size": size,
            "media_offset": media_offset,
            "media_size": row["num_bytes"],
            "sha256": row["sha256"],
            **{k: sample["record"].get(k) for k in RECORD_KEYS_FOR_INDEX},
            **{k: scores.get(k) for k in score_columns},
        }


def index_schema(score_columns: list[str]) -> pa.Schema:
    """index.parquet: one row per released sample; the ledger's numeric columns follow as float64."""
    schema = INDEX_SCHEMA
    for name in score_columns:
        schema = schema.append(pa.field(name, pa.float64()))
    return schema
