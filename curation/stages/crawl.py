"""Crawl: download (or read) every record's media, probe it, hash it, and write webdataset shards.

Images go through img2dataset's ``Downloader`` (its thread pool and shard loop), video and audio through the
project's own :class:`~curation.crawl.fetch.HttpFetcher`; both fetch with the same policy (http/https only,
private addresses refused unless allowed, size cap while streaming, bounded redirects and retries, per-host
limits). Records that already have local media (a media folder, webdataset or img2dataset shards) are read from
disk instead. Each input shard is one Ray Data task and gives one output shard:

    crawl/shards/<shard>.tar      webdataset: <uid>.<ext>, <uid>.txt (caption), <uid>.json (record)
    crawl/shards/<shard>.parquet  the kept records (schemas/record.schema.json)
    crawl/ledger/<shard>.parquet  every record of the shard, kept or rejected with a reason
    crawl/done/<shard>.json       written last: the shard is complete

img2dataset works in ``crawl/_work/<shard>/``, not the system's temp folder: a worker killed mid-shard leaves
its files in the run, and the shard's next attempt clears them (as it clears half-written ``.*.tmp-*`` files).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import CrawlConfig
from curation.fsutil import atomic_path
from curation.ledger import kept_row, rejected_row, write_part
from curation.schemas import RECORD_SCHEMA
from curation.stages.base import Stage, log, map_shards

# fixed tar member mtime: the same input gives byte-identical shards (an int: a float adds a PAX header a member)
TAR_MTIME = 946684800


def make_fetcher(cfg: CrawlConfig):
    from curation.crawl.fetch import FetchPolicy, HttpFetcher

    return HttpFetcher(
        FetchPolicy(
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            max_bytes=cfg.max_bytes,
            max_redirects=cfg.max_redirects,
            retries=cfg.retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            per_host_concurrency=cfg.per_host_concurrency,
            allow_private_addresses=cfg.allow_private_addresses,
            user_agent=cfg.user_agent,
        )
    )


class _CollectingWriter:
    """An img2dataset sample writer that hands each downloaded image back to the crawl stage instead of writing
    a shard of its own: img2dataset's writer interface is the seam it offers for custom outputs."""

    def __init__(self, sink: dict[str, tuple[bytes | None, str | None]], *_args: Any) -> None:
        self.sink = sink

    def write(self, img_str: bytes | None, key: str, caption: str | None, meta: dict[str, Any]) -> None:
        self.sink[meta["uid"]] = (img_str, meta.get("error_message"))

    def close(self) -> None:
        pass


@contextmanager
def _img2dataset_uses(fetcher):
    """img2dataset's Downloader calls the module-level ``download_image_with_retry`` and has no parameter for a
    fetch function; swapping it (in this worker process, for this shard only) puts images under the same
    crawl policy as video and audio instead of plain urllib."""
    import img2dataset.downloader as i2d

    from curation.crawl.fetch import img2dataset_fetch_function

    adapter = img2dataset_fetch_function(fetcher)
    original = i2d.download_image_with_retry
    i2d.download_image_with_retry = lambda row, *args, **kwargs: adapter(row, *args, **kwargs)
    try:
        yield
    finally:
        i2d.download_image_with_retry = original


def _download_images(rows: list[dict[str, Any]], cfg: CrawlConfig, fetcher, work: Path) -> dict[str, tuple]:
    """Run img2dataset's Downloader over the image URLs of one shard, in the folder ``work`` (emptied first,
    removed after); returns uid -> (bytes, error message)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations, which phones home
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer

    sink: dict[str, tuple[bytes | None, str | None]] = {}
    shutil.rmtree(work, ignore_errors=True)  # what a killed attempt left
    work.mkdir(parents=True)
    try:
        feather = work / "urls.feather"
        table = pa.table({k: [r[k] for r in rows] for k in ("url", "caption", "uid")})
        with pa.OSFile(str(feather), "wb") as sink_file, pa.ipc.new_file(sink_file, table.schema) as writer:
            writer.write_table(table)
        downloader = Downloader(
            sample_writer_class=partial(_CollectingWriter, sink),
            # keep the original bytes: probing, hashing and any resizing belong to later, explicit stages
            resizer=Resizer(image_size=0, resize_mode="no", resize_only_if_bigger=False, disable_all_reencoding=True),
            thread_count=cfg.threads,
            save_caption=True,
            extract_exif=False,
            output_folder=str(work),
            column_list=["url", "caption", "uid"],
            timeout=cfg.read_timeout_s,
            number_sample_per_shard=max(len(rows), 1),
            oom_shard_count=5,
            compute_hash=None,
            verify_hash_type=None,
            encode_format="jpg",
            retries=0,  # our fetcher retries, with backoff and Retry-After
            user_agent_token=None,
            disallowed_header_directives=None,
        )
        with _img2dataset_uses(fetcher):
            # download_shard, not __call__: __call__ swallows a failed shard into a print
            downloader.download_shard((0, str(feather)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sink


def _read_local(row: dict[str, Any], max_bytes: int) -> tuple[bytes | None, str | None, str | None]:
    """Media of a record that is already on disk: (bytes, reason, detail)."""
    path = Path(row["local_path"])
    try:
        if row["tar_member"]:
            with tarfile.open(path) as tf:
                member = tf.getmember(row["tar_member"])
                if member.size > max_bytes:
                    return None, "too_large", f"{path}:{member.name} is {member.size} bytes > {max_bytes}"
                return tf.extractfile(member).read(), None, None
        size = path.stat().st_size
        if size > max_bytes:
            return None, "too_large", f"{path} is {size} bytes > {max_bytes}"
        return path.read_bytes(), None, None
    except (OSError, KeyError, tarfile.TarError) as e:
        return None, "unreadable", f"{path}: {e}"


def crawl_shard(shard: str, input_path: str, out_dir: str, cfg: CrawlConfig) -> dict[str, Any]:
    """Crawl one input shard into one output shard; returns its summary. Runs inside a Ray task."""
    import hashlib

    import webdataset as wds

    from curation.crawl.fetch import split_error_message
    from curation.crawl.probe import probe_media

    started = time.time()
    out = Path(out_dir)
    rows = pq.read_table(input_path).to_pylist()
    rows = [r for r in rows if r["input_error"] is None]  # rejected at input; already in the ledger
    fetcher = make_fetcher(cfg)

    fetched: dict[str, tuple[bytes | None, str | None, str | None]] = {}
    images = [r for r in rows if r["url"] and r["modality"] == "image"]
    if images:
        for uid, (data, err) in _download_images(images, cfg, fetcher, out / "_work" / shard).items():
            fetched[uid] = (data, None, None) if err is None else (None, *split_error_message(err))
    others = [r for r in rows if r["url"] and r["modality"] != "image"]

    def fetch_one(row: dict[str, Any]) -> tuple[str, tuple]:
        res = fetcher.fetch(row["url"])
        return row["uid"], (res.data, None, None) if res.ok else (None, res.error, res.detail)

    with ThreadPoolExecutor(max_workers=cfg.threads) as pool:
        fetched.update(pool.map(fetch_one, others))
    for row in rows:
        if not row["url"]:
            fetched[row["uid"]] = _read_local(row, cfg.max_bytes)

    records, ledger_rows, reasons = [], [], Counter()
    num_bytes = 0
    tar_path = out / "shards" / f"{shard}.tar"
    with atomic_path(tar_path) as tmp_tar, open(tmp_tar, "wb") as f:
        sink = wds.TarWriter(f, mtime=TAR_MTIME)
        for row in rows:  # input order: deterministic shards whatever order downloads finished in
            uid = row["uid"]
            data, reason, detail = fetched.get(uid, (None, "connection_error", "no response"))
            probe = None
            if data is not None:
                probe = probe_media(data, row["modality"], max_pixels=cfg.max_pixels, max_duration_s=cfg.max_duration_s)
                if not probe.ok:
                    reason, detail = probe.reason, probe.detail
            if reason is not None:
                reasons[reason] += 1
                ledger_rows.append(rejected_row(uid, "crawl", reason, f"{row['url'] or row['local_path']}: {detail}"))
                continue
            # the probe's metadata fields, except modality, which the record already holds from the probe itself
            meta = {k: v for k, v in probe.to_dict().items() if k != "modality"}
            record = {
                "uid": uid,
                "modality": probe.modality,
                "source": row["source"],
                "url": row["url"],
                "caption": row["caption"],
                "shard": shard,
                "sha256": hashlib.sha256(data).hexdigest(),
                "num_bytes": len(data),
                **meta,
            }
            sink.write(
                {
                    "__key__": uid,
                    record["ext"]: data,
                    "txt": row["caption"].encode("utf-8"),
                    "json": json.dumps(record, sort_keys=True).encode("utf-8"),
                }
            )
            records.append(record)
            ledger_rows.append(kept_row(uid, "crawl"))
            num_bytes += len(data)
        sink.close()
    with atomic_path(out / "shards" / f"{shard}.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), tmp)
    write_part(out / "ledger" / f"{shard}.parquet", ledger_rows)
    summary = {
        "input": len(rows),
        "kept": len(records),
        "rejected": len(rows) - len(records),
        "reasons": dict(sorted(reasons.items())),
        "bytes": num_bytes,
        "seconds": round(time.time() - started, 3),
    }
    return summary


def _crawl_task(shard: str, path: str, out_dir: str, cfg: CrawlConfig) -> dict[str, Any]:
    """One Ray task of :func:`map_shards`: crawl a shard and write its done marker."""
    from curation.fsutil import write_json

    summary = {**crawl_shard(shard, path, out_dir, cfg), "shard": shard}
    write_json(Path(out_dir) / "done" / f"{shard}.json", summary)
    return summary


class CrawlStage(Stage):
    """Download or read every record's media; probe, hash and shard it."""

    name = "crawl"
    order = 10
    config_sections = ("crawl",)
    help = "download (or read) media, probe and hash it, write webdataset shards"

    def run(self, input_stage: str = "input") -> dict[str, Any]:
        cfg = self.config.crawl
        shard_files = sorted((self.ctx.run_dir / "input" / "records").glob("*.parquet"))
        pending = [p for p in shard_files if not self.is_shard_done(p.stem)]
        log.info("crawl: %d shards, %d already complete", len(shard_files), len(shard_files) - len(pending))
        for folder in ("shards", "ledger", "done"):  # half-written files of a killed attempt
            for path in (self.dir / folder).glob(".*.tmp-*"):
                path.unlink()
        items = [{"shard": p.stem, "path": str(p)} for p in pending]
        summaries = map_shards(_crawl_task, items, cfg.num_cpus, cfg.parallelism, out_dir=str(self.dir), cfg=cfg)
        for done, s in enumerate(summaries, 1):
            log.info(
                "crawl: shard %s done (%d/%d): %d kept, %d rejected %s in %.1f s",
                s["shard"],
                done,
                len(pending),
                s["kept"],
                s["rejected"],
                s["reasons"] or "",
                s["seconds"],
            )
        shutil.rmtree(self.dir / "_work", ignore_errors=True)
        totals: Counter = Counter()
        reasons: Counter = Counter()
        for p in shard_files:
            s = json.loads(self.done_path(p.stem).read_text())
            totals.update({k: s[k] for k in ("input", "kept", "rejected", "bytes")})
            reasons.update(s["reasons"])
        return {**dict(totals), "shards": len(shard_files), "reasons": dict(sorted(reasons.items()))}
