"""The format stage at scale: kept records turned into LLaVA-form conversations, as text and pre-tokenized with
the trainer's tokenizer, side by side with its bound, measured in the same run.

    .venv/bin/python benchmarks/format.py                       # 200,000 records, text and tokenized
    .venv/bin/python benchmarks/format.py --records 1000000 --modes text

The run is generated inside the benchmark (not timed): crawl shards of ``--shard-size`` records with the columns
a crawl writes (captions of 6 to 24 words, probed width, height, duration, frame rate, sample rate, channels)
and a ledger in which every record is kept, as a finished filter leaves them. Ray is started first (not timed),
as the runner does. Timed, wall clock (time.perf_counter):

- ``stage``: the format stage over every kept record: conversations, the media-token checks, the shards and
  ledger parts written; ``tokenized`` also stores input_ids and labels made with the bootstrap LM's tokenizer
  (``format.tokenizer``), which is what training reads;
- ``bound``: the same formatter (:class:`curation.stages.format.InstructionFormatter`) over the first
  ``--bound-records`` records in one process, nothing read or written, its rate times the CPUs the stage may use
  (the cluster's CPUs, at most one a shard, at most ``--parallelism``). ``stage / bound`` is the share of that the
  stage reaches. ``--parallelism 1`` times the stage formatting every shard on the driver, as it did before it
  ran Ray tasks.

Each figure is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODALITIES = (("image", 0.6), ("video", 0.2), ("audio", 0.2))
WORDS = (
    "a red green blue small large circle square triangle on the left right top bottom of white gray background "
    "with two three short long beeps tone rising falling dog cat walking running in park street at night day"
).split()


def make_run(run_dir: Path, n: int, shard_size: int, seed: int = 0) -> None:
    """A run of ``n`` crawled records, every one kept (see the module's notes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    uids = np.char.zfill(np.char.mod("%x", np.arange(n)), 16).astype(object)  # as a crawl makes them: 16 hex digits
    modality = rng.choice([m for m, _ in MODALITIES], size=n, p=[p for _, p in MODALITIES])
    lengths = rng.integers(6, 25, n)
    words = np.array(WORDS, dtype=object)[rng.integers(0, len(WORDS), int(lengths.sum()))]
    captions = [" ".join(c) for c in np.split(words, np.cumsum(lengths)[:-1])]
    image, video, audio = (modality == m for m in ("image", "video", "audio"))
    visual = image | video

    def column(values, mask, type_):
        return pa.array(values, type_, mask=~mask)

    records = pa.table(
        {
            "uid": pa.array(uids, pa.string()),
            "modality": pa.array(modality.astype(object), pa.string()),
            "caption": pa.array(captions, pa.string()),
            "width": column(rng.integers(64, 2048, n), visual, pa.int32()),
            "height": column(rng.integers(64, 2048, n), visual, pa.int32()),
            "duration_s": column(rng.uniform(1, 300, n), video | audio, pa.float64()),
            "fps": column(rng.choice([24.0, 25.0, 29.97, 30.0], n), video, pa.float64()),
            "num_frames": column(rng.integers(24, 9000, n), video, pa.int32()),
            "sample_rate": column(rng.choice([16000, 22050, 44100, 48000], n), audio, pa.int32()),
            "channels": column(rng.integers(1, 3, n), audio, pa.int32()),
        }
    )
    (run_dir / "crawl" / "shards").mkdir(parents=True)
    for i, start in enumerate(range(0, n, shard_size)):
        pq.write_table(records.slice(start, shard_size), run_dir / "crawl" / "shards" / f"{i:05d}.parquet")
    null = pa.nulls(n, pa.string())
    ledger = pa.table({"uid": records["uid"], "modality": records["modality"], "source": pa.array(["urls.parquet"] * n),
                       "url": null, "status": pa.array(["kept"] * n), "stage": null, "reason": null, "detail": null,
                       "dup_of": null})  # fmt: skip
    pq.write_table(ledger, run_dir / "ledger.parquet")


def format_stage(run_dir: Path, tokenizer: str | None, parallelism: int | None = None) -> dict:
    """The format stage over the run (its previous output removed); its summary."""
    from curation.config import load_config
    from curation.stages.base import StageContext
    from curation.stages.format import FormatStage

    shutil.rmtree(run_dir / "format", ignore_errors=True)
    config = load_config(
        data={"stages": ["crawl", "format"], "format": {"tokenizer": tokenizer, "parallelism": parallelism}}
    )
    return FormatStage(StageContext(run_dir, config)).run("crawl")


def one_process(run_dir: Path, tokenizer: str | None, records: int) -> float:
    """Seconds a record of the formatter alone, in this process, over the run's first ``records`` records."""
    import pyarrow.parquet as pq

    from curation.config import load_config
    from curation.instruct import load_tokenizer
    from curation.stages.format import InstructionFormatter

    cfg = load_config(data={"format": {"tokenizer": tokenizer}}).format
    formatter = InstructionFormatter(cfg, load_tokenizer(tokenizer) if tokenizer else None)
    rows = []
    for path in sorted((run_dir / "crawl" / "shards").glob("*.parquet")):
        rows += pq.read_table(path).slice(0, records - len(rows)).to_pylist()
        if len(rows) >= records:
            break
    started = time.perf_counter()
    for row in rows:
        formatter.format(row)
    return (time.perf_counter() - started) / len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="records a crawl shard (img2dataset's default)")
    ap.add_argument("--modes", nargs="+", choices=["text", "tokenized"], default=["text", "tokenized"])
    ap.add_argument("--bound-records", type=int, default=20_000, help="records the one-process bound formats")
    ap.add_argument("--parallelism", type=int, default=None,
                    help="format.parallelism: shards at once (default: one a CPU; 1: the driver alone)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if min(args.records, args.shard_size, args.bound_records, args.repeats) < 1:
        ap.error("--records, --shard-size, --bound-records and --repeats must be at least 1")

    import ray

    from curation.config import load_config
    from curation.models import bootstrap
    from curation.runner import init_ray, setup_logging

    setup_logging()
    tokenizer = str(bootstrap.ensure("lm")) if "tokenized" in args.modes else None
    tmp = Path(tempfile.mkdtemp(prefix="bench-format-"))
    shards = -(-args.records // args.shard_size)
    results: dict = {
        "records": args.records,
        "shard_size": args.shard_size,
        "parallelism": args.parallelism,
        "rows": [],
    }
    try:
        run_dir = tmp / "run"
        print(f"generating a run of {args.records:,} records ...", flush=True)
        make_run(run_dir, args.records, args.shard_size)
        init_ray(load_config(data={}))
        cpus = min(int(ray.cluster_resources().get("CPU", 1)), shards, args.parallelism or shards)
        results["cpus"] = cpus
        for mode in args.modes:
            tok = tokenizer if mode == "tokenized" else None
            stage = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                summary = format_stage(run_dir, tok, args.parallelism)
                stage.append(time.perf_counter() - started)
                assert summary["kept"] + summary["rejected"] == args.records, summary
            per_record = statistics.median(one_process(run_dir, tok, args.bound_records) for _ in range(args.repeats))
            seconds = statistics.median(stage)
            row = {"mode": mode, "stage_s": round(seconds, 3), "stage_rps": round(args.records / seconds, 1),
                   "one_process_rps": round(1 / per_record, 1), "bound_rps": round(cpus / per_record, 1)}  # fmt: skip
            row["ratio"] = round(row["stage_rps"] / row["bound_rps"], 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.records:,} records, shards of {args.shard_size:,}, {results['cpus']} CPUs for the bound; "
          f"medians of {args.repeats} (records/s)")  # fmt: skip
    print(f"{'mode':<10} {'stage s':>8} {'stage':>9} {'1 process':>10} {'bound':>9} {'ratio':>6}")
    for r in results["rows"]:
        print(f"{r['mode']:<10} {r['stage_s']:>8.2f} {r['stage_rps']:>9,.0f} {r['one_process_rps']:>10,.0f} "
              f"{r['bound_rps']:>9,.0f} {r['ratio']:>6.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
