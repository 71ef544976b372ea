"""Re-filtering a finished run at scale: `curation filter RUN_DIR --recipe X` on a synthetic run of a million
records, side by side with DataComp's own way of filtering the same scores, timed in the same run.

    .venv/bin/python benchmarks/filter.py                        # 1,000,000 records (about a minute on 2 cores)
    .venv/bin/python benchmarks/filter.py --records 100000 --recipes laion

The run is generated inside the benchmark (not timed): input records, a crawl ledger (5% rejected), crawl shards
of ``--shard-size`` records and a score ledger with the score columns (CLIP score, perplexity, language and its
score, a text-quality ratio), as a finished crawl and score leave them. Timed, wall clock (time.perf_counter):

- ``assemble``: :func:`curation.ledger.assemble_ledger` over the crawl and score stages, which every stage's
  completion pays (the runner assembles the ledger before and after each stage);
- ``filter``: the filter stage with a recipe, then the ledger assembled with it: what `curation filter` does
  beyond starting Python;
- ``peer``: DataComp's baselines (``baselines/utils.py``): the score columns read with pandas, each rule a boolean
  mask (a percentile rule cut at the k-th value per modality), the kept uids saved sorted as a ``.npy`` file. It
  gives no reasons and no ledger; ``filter / peer`` is what the ledger (a reason and detail per rejected record,
  every record accounted for) costs on top.

Each figure is the median of ``--repeats`` runs; the driver's peak RSS is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODALITIES = (("image", 0.6), ("video", 0.2), ("audio", 0.2))


def make_run(run_dir: Path, n: int, shard_size: int, seed: int = 0) -> None:
    """A finished crawl + score run of ``n`` records (see the module's notes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    uids = np.char.add("r", np.char.zfill(np.arange(n).astype(str), 9)).astype(object)
    modality = rng.choice([m for m, _ in MODALITIES], size=n, p=[p for _, p in MODALITIES]).astype(object)
    records = pa.table({"uid": pa.array(uids, pa.string()), "modality": pa.array(modality, pa.string()),
                        "source": pa.array(["urls.parquet"] * n, pa.string()),
                        "url": pa.array(np.char.add("http://example.com/", uids.astype(str)).astype(object))})  # fmt: skip
    crawl_rejected = rng.random(n) < 0.05
    null = pa.nulls(n, pa.string())
    crawl = pa.table({"uid": records["uid"], "status": pa.array(np.where(crawl_rejected, "rejected", "kept")),
                      "stage": pa.array(["crawl"] * n), "reason": pa.array(np.where(crawl_rejected, "http_404", None)),
                      "detail": null, "dup_of": null})  # fmt: skip
    kept = np.flatnonzero(~crawl_rejected)
    m = len(kept)
    clip = rng.normal(0.3, 0.08, m)
    clip[rng.random(m) < 0.001] = np.nan  # a few records without a score
    score = pa.table({"uid": records["uid"].take(kept), "status": pa.array(["kept"] * m), "stage": pa.array(["score"] * m),
                      "reason": pa.nulls(m, pa.string()), "detail": pa.nulls(m, pa.string()),
                      "dup_of": pa.nulls(m, pa.string()), "clip_score": pa.array(clip, from_pandas=True),
                      "perplexity": pa.array(rng.lognormal(3.5, 0.8, m)),
                      "lang": pa.array(np.where(rng.random(m) < 0.9, "en", "de").astype(object), pa.string()),
                      "lang_score": pa.array(rng.uniform(0.3, 1.0, m)),
                      "text_alpha_words_ratio": pa.array(rng.uniform(0.3, 1.0, m))})  # fmt: skip
    for folder in ("input/records", "input/ledger", "crawl/ledger", "crawl/shards", "score/ledger"):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
    pq.write_table(records, run_dir / "input/records/00000.parquet")
    for i, start in enumerate(range(0, n, shard_size)):
        part = slice(start, start + shard_size)
        name = f"{i:05d}.parquet"
        pq.write_table(crawl.slice(start, shard_size), run_dir / "crawl/ledger" / name)
        rows = kept[(kept >= part.start) & (kept < part.stop)]
        shard = records.select(["uid", "modality"]).take(rows)
        pq.write_table(
            shard.append_column("caption", pa.array(["a caption"] * len(rows))), run_dir / "crawl/shards" / name
        )
        at = np.searchsorted(kept, rows)
        pq.write_table(score.take(at), run_dir / "score/ledger" / name)


def timed(fn, *args) -> tuple[float, Any]:
    """(seconds, result) of ``fn(*args)``."""
    started = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - started, out


def refilter(run_dir: Path, recipe: str) -> dict:
    """The filter stage with ``recipe`` (its previous output removed), then the ledger assembled with it."""
    from curation.config import load_config
    from curation.ledger import assemble_ledger
    from curation.stages.base import StageContext
    from curation.stages.filter import FilterStage

    shutil.rmtree(run_dir / "filter", ignore_errors=True)
    config = load_config(data={"stages": ["crawl", "score", "filter"], "filter": {"recipe": recipe}})
    summary = FilterStage(StageContext(run_dir, config)).run()
    counts = assemble_ledger(run_dir, ["crawl", "score", "filter"])
    assert counts["kept"] == summary["kept"] and counts["kept"] + counts["rejected"] == counts["input"], counts
    return counts


def peer(run_dir: Path, recipe: str, out: Path) -> int:
    """DataComp's way (``baselines/utils.py``): pandas reads the score columns, the recipe's rules are boolean masks
    (absolute bounds; a percentile rule cuts at its k-th value per modality), the kept uids are saved sorted."""
    import math

    import pandas as pd

    from curation.filtering import load_recipe

    rules = load_recipe(recipe).rules
    signals = sorted({r.signal for r in rules})
    df = pd.read_parquet(run_dir / "ledger.parquet", columns=["uid", "modality", "status", *signals])
    df = df[df["status"] == "kept"]
    keep = np.ones(len(df), bool)
    for rule in rules:
        v = df[rule.signal]
        ok = v.notna().to_numpy() if rule.missing == "reject" else np.ones(len(df), bool)
        if rule.min is not None:
            ok &= ~(v < rule.min).to_numpy()
        if rule.max is not None:
            ok &= ~(v > rule.max).to_numpy()
        if rule.one_of is not None:
            ok &= v.isin(rule.one_of).to_numpy() | v.isna().to_numpy()
        pct = rule.top_percent if rule.top_percent is not None else rule.bottom_percent
        if pct is not None:
            for modality in rule.modalities:
                where = (df["modality"] == modality).to_numpy() & v.notna().to_numpy()
                values = np.sort(v.to_numpy()[where])
                if not len(values):
                    continue
                k = max(1, math.ceil(len(values) * pct / 100))
                cut = values[-k] if rule.top_percent is not None else values[k - 1]
                bad = v.to_numpy() < cut if rule.top_percent is not None else v.to_numpy() > cut
                ok &= ~(where & bad)
        applies = df["modality"].isin(rule.modalities).to_numpy()
        keep &= ok | ~applies
    uids = np.sort(df["uid"].to_numpy()[keep].astype(str))
    np.save(out, uids)
    return len(uids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000, help="records a crawl shard (img2dataset's default)")
    ap.add_argument("--recipes", nargs="+", default=["laion", "datacomp"], help="recipes in filters/ to time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.records < 1 or args.shard_size < 1 or args.repeats < 1:
        ap.error("--records, --shard-size and --repeats must be at least 1")

    from curation.ledger import assemble_ledger

    tmp = Path(tempfile.mkdtemp(prefix="bench-filter-"))
    results: dict = {"records": args.records, "shard_size": args.shard_size, "rows": []}
    try:
        run_dir = tmp / "run"
        print(f"generating a run of {args.records:,} records ...", flush=True)
        make_run(run_dir, args.records, args.shard_size)
        assemble = [timed(assemble_ledger, run_dir, ["crawl", "score"])[0] for _ in range(args.repeats)]
        results["assemble_s"] = round(statistics.median(assemble), 3)
        print(f"assemble (crawl, score): {results['assemble_s']:.2f} s", flush=True)
        for recipe in args.recipes:
            ours, theirs, kept = [], [], {}
            for _ in range(args.repeats):
                assemble_ledger(run_dir, ["crawl", "score"])  # the ledger `curation filter` starts from
                seconds, counts = timed(refilter, run_dir, recipe)
                ours.append(seconds)
                kept["ours"] = counts["kept"]
                assemble_ledger(run_dir, ["crawl", "score"])
                seconds, kept["peer"] = timed(peer, run_dir, recipe, tmp / "uids.npy")
                theirs.append(seconds)
            if kept["ours"] != kept["peer"]:
                raise SystemExit(f"{recipe}: the filter kept {kept['ours']} records, the peer's masks {kept['peer']}")
            row = {"recipe": recipe, "kept": kept["ours"], "filter_s": round(statistics.median(ours), 3),
                   "peer_s": round(statistics.median(theirs), 3)}  # fmt: skip
            row["ratio"] = round(row["filter_s"] / row["peer_s"], 2)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(f"\n{args.records:,} records, shards of {args.shard_size:,}; medians of {args.repeats} (seconds)")
    print(f"ledger assembly (crawl, score): {results['assemble_s']:.2f}")
    print(f"{'recipe':<10} {'kept':>9} {'filter':>8} {'peer':>7} {'ratio':>6}")
    for r in results["rows"]:
        print(f"{r['recipe']:<10} {r['kept']:>9,} {r['filter_s']:>8.2f} {r['peer_s']:>7.2f} {r['ratio']:>6.2f}")
    print(f"driver peak RSS: {results['peak_rss_mib']:,} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
