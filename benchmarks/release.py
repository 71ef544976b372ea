"""The release stage at scale: formatted samples written as webdataset shards with their index, card and manifest,
side by side with webdataset's own ShardWriter writing the same samples, measured in the same run.

    .venv/bin/python benchmarks/release.py                       # 100,000 samples of 4 KiB media
    .venv/bin/python benchmarks/release.py --records 20000 --repeats 1

The run is generated inside the benchmark (not timed): the records of ``benchmarks/format.py`` with the columns a
crawl adds (source, url, file type, sha256, size), crawl shards of ``--shard-size`` records whose tars hold
``--media-bytes`` of random bytes a record, every record kept, and the format stage run over them. Ray is started
first (not timed), as the runner does. Timed, wall clock (time.perf_counter):

- ``stage``: the release stage: its plan (every sample's ``.json`` member), the shards (each sample's media read
  from its crawl shard and checked against its sha256, its JSON checked against the schema), ``index.parquet``,
  the dataset card and ``manifest.json``;
- ``peer``: what a script with webdataset does for the same release in one process: every kept record's media
  read from its crawl shard, its sample JSON made from the formatted row (``json.dumps``), and
  ``webdataset.ShardWriter`` writing media, JSON and caption, ``--shard-size`` samples a shard. No index, card,
  checksums or checks. ``bound`` is its rate times the CPUs the stage may use (the cluster's, at most one a
  crawl shard); ``stage / bound`` is the share of that the stage reaches.

Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import format as format_bench  # noqa: E402  (benchmarks/format.py: the records, and the format stage)

EXTS = {"image": ("jpg", "image/jpeg"), "video": ("mp4", "video/mp4"), "audio": ("wav", "audio/wav")}


def make_run(run_dir: Path, n: int, shard_size: int, media_bytes: int, seed: int = 0) -> None:
    """A crawled, formatted run of ``n`` records with ``media_bytes`` of media each (see the module's notes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.stages.crawl import TAR_MTIME

    format_bench.make_run(run_dir, n, shard_size, seed)
    rng = np.random.default_rng(seed + 1)
    for path in sorted((run_dir / "crawl" / "shards").glob("*.parquet")):
        table = pq.read_table(path)
        rows = table.num_rows
        media = [rng.bytes(media_bytes) for _ in range(rows)]
        modality = table.column("modality").to_pylist()
        uids = table.column("uid").to_pylist()
        ext = [EXTS[m][0] for m in modality]
        extra = {
            "source": pa.array(["urls.parquet"] * rows),
            "url": pa.array([f"http://example.com/{u}.{e}" for u, e in zip(uids, ext)]),
            "shard": pa.array([path.stem] * rows),
            "ext": pa.array(ext),
            "mime": pa.array([EXTS[m][1] for m in modality]),
            "sha256": pa.array([hashlib.sha256(b).hexdigest() for b in media]),
            "num_bytes": pa.array([media_bytes] * rows, pa.int64()),
        }
        for name, column in extra.items():
            table = table.append_column(name, column)
        pq.write_table(table, path)
        with tarfile.open(path.with_suffix(".tar"), "w") as tar:
            for uid, e, data in zip(uids, ext, media):
                info = tarfile.TarInfo(f"{uid}.{e}")
                info.size, info.mtime = len(data), int(TAR_MTIME)
                tar.addfile(info, fileobj=io.BytesIO(data))
    format_bench.format_stage(run_dir, None)


def release_stage(run_dir: Path) -> dict:
    """The release stage over the run (its previous output removed); its summary."""
    from curation.config import load_config
    from curation.stages.base import StageContext
    from curation.stages.release import ReleaseStage

    shutil.rmtree(run_dir / "release", ignore_errors=True)
    config = load_config(data={"name": "bench", "stages": ["crawl", "format", "release"]})
    return ReleaseStage(StageContext(run_dir, config)).run("format")


def peer(run_dir: Path, out: Path, shard_size: int) -> int:
    """webdataset's ShardWriter writing every kept record's media, sample JSON and caption, in one process."""
    import pyarrow.parquet as pq
    import webdataset as wds

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    written = 0
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for path in sorted((run_dir / "crawl" / "shards").glob("*.parquet")):
            formatted = {r["uid"]: r for r in pq.read_table(run_dir / "format" / "shards" / path.name).to_pylist()}
            records = pq.read_table(path).to_pylist()
            with tarfile.open(path.with_suffix(".tar")) as tar:
                for record, member in zip(records, tar):
                    f = formatted[record["uid"]]
                    sample = {"id": record["uid"], record["modality"]: member.name, "record": record,
                              "conversations": f["conversations"], "pretrain_conversations": f["pretrain_conversations"]}  # fmt: skip
                    sink.write({"__key__": record["uid"], record["ext"]: tar.extractfile(member).read(),
                                "json": json.dumps(sample).encode(), "txt": record["caption"].encode()})  # fmt: skip
                    written += 1
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="records a crawl shard (img2dataset's default)")
    ap.add_argument("--media-bytes", type=int, default=4096, help="bytes of media a record")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if min(args.records, args.shard_size, args.media_bytes, args.repeats) < 1:
        ap.error("--records, --shard-size, --media-bytes and --repeats must be at least 1")

    import ray

    from curation.config import load_config
    from curation.runner import init_ray, setup_logging

    setup_logging()
    tmp = Path(tempfile.mkdtemp(prefix="bench-release-"))
    shards = -(-args.records // args.shard_size)
    try:
        run_dir = tmp / "run"
        print(f"generating a run of {args.records:,} records ...", flush=True)
        make_run(run_dir, args.records, args.shard_size, args.media_bytes)
        init_ray(load_config(data={}))
        cpus = min(int(ray.cluster_resources().get("CPU", 1)), shards)
        stage, theirs = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            summary = release_stage(run_dir)
            stage.append(time.perf_counter() - started)
            if summary["kept"] != args.records:
                raise SystemExit(f"the release kept {summary['kept']} of {args.records} samples: {summary['reasons']}")
            started = time.perf_counter()
            written = peer(run_dir, tmp / "peer", args.shard_size)
            theirs.append(time.perf_counter() - started)
            assert written == args.records, written
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    s, p = statistics.median(stage), statistics.median(theirs)
    results = {"records": args.records, "shard_size": args.shard_size, "media_bytes": args.media_bytes,
               "cpus": cpus, "stage_s": round(s, 3), "stage_rps": round(args.records / s, 1),
               "peer_s": round(p, 3), "peer_rps": round(args.records / p, 1),
               "bound_rps": round(cpus * args.records / p, 1)}  # fmt: skip
    results["ratio"] = round(results["stage_rps"] / results["bound_rps"], 2)
    print(json.dumps(results))
    print(f"\n{args.records:,} samples of {args.media_bytes:,} bytes, crawl shards of {args.shard_size:,}, "
          f"{cpus} CPUs for the bound; medians of {args.repeats}")  # fmt: skip
    print(f"{'':<7} {'seconds':>8} {'samples/s':>10}")
    print(f"{'stage':<7} {results['stage_s']:>8.2f} {results['stage_rps']:>10,.0f}")
    print(f"{'peer':<7} {results['peer_s']:>8.2f} {results['peer_rps']:>10,.0f}")
    print(f"{'bound':<7} {'':>8} {results['bound_rps']:>10,.0f}   (peer x {cpus} CPUs)")
    print(f"stage / bound: {results['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
