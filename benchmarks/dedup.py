"""Dedup at scale: SemDeDup over synthetic embeddings and MinHash over synthetic captions, at several sizes in one
run, so the growth of each cost can be read off side by side.

    .venv/bin/python benchmarks/dedup.py                       # 100k and 1M of each (a few minutes on 2 cores)
    .venv/bin/python benchmarks/dedup.py --sizes 20000,100000  # quicker
    .venv/bin/python benchmarks/dedup.py --only minhash

Data are generated inside the benchmark, with planted duplicates so recall (and precision) can be printed:

- embeddings: 512-d, clustered Gaussian (2000 topics; two points of one topic have cosine ~0.5), L2-normalised;
  1% of the points are copies of another point plus a small perturbation (cosine >= 0.995).
- captions: templated sentences (~16-22 words, eight slots from word lists); 1% are copies of another caption
  with one edit (a word appended or dropped at the end, or case and punctuation changed).

Timing is wall clock (time.perf_counter) on a local Ray instance with the machine's CPUs; the data generation is
not timed. Memory: the driver's peak RSS (resource.getrusage), and tracemalloc's peak of the timed section (numpy
buffers included); Ray workers' memory is not in these (they read the embeddings zero-copy from the object store).
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 512
TOPICS = 2000
PLANTED = 0.01
EPS = 0.01  # remove above cosine 0.99


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def make_embeddings(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (n, 512) float32 normalised, copy (m,), source (m,)): x[copy[i]] is a near-copy of x[source[i]]."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((TOPICS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, DIM), dtype=np.float32)
    step = 100_000
    for lo in range(0, n, step):  # in chunks: the temporaries of one chunk are small
        hi = min(n, lo + step)
        noise = rng.standard_normal((hi - lo, DIM), dtype=np.float32) * np.float32(1.0 / np.sqrt(DIM))
        x[lo:hi] = centres[rng.integers(0, TOPICS, hi - lo)] + noise
    m = int(n * PLANTED)
    picks = rng.choice(n, 2 * m, replace=False)
    source, copy = picks[:m], picks[m:]
    x[copy] = x[source] + rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(0.05 / np.sqrt(DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, copy, source


_SLOTS = {
    "det": ["a", "the", "one", "this", "that", "another", "some", "every"],
    "adj": "red green blue small large old new bright dark wooden shiny broken quiet noisy tall short round "
    "square empty crowded tiny huge ancient modern rusty golden silver striped spotted foggy sunny".split(),
    "noun": "dog cat horse bicycle car tree house bridge river mountain boat train bird flower table chair lamp "
    "window door street market garden beach forest castle tower robot guitar piano clock kite balloon".split(),
    "verb": "stands sits rests waits lies leans hangs floats shines glows moves turns rolls spins jumps runs".split(),
    "prep": "near beside behind under above inside across along around beyond toward past".split(),
    "place": "park city village harbor desert valley station museum library stadium airport farm island "
    "canyon meadow plaza alley rooftop courtyard lake".split(),
    "time": "morning noon afternoon evening night dawn dusk midnight winter summer spring autumn".split(),
    "mood": "calm busy bright gloomy peaceful lively misty rainy windy snowy warm cold".split(),
}
_TEMPLATES = [
    "{det} {adj} {noun} {verb} {prep} {det2} {adj2} {noun2} in the {place} on a {mood} {time} with {det3} {noun3}",
    "in the {place} {det} {adj} {noun} {verb} {prep} {det2} {noun2} while {det3} {adj2} {noun3} watches at {time}",
    "photo of {det} {adj} {noun} that {verb} {prep} {det2} {adj2} {noun2} during a {mood} {time} at the {place}",
    "{det} {noun} and {det2} {adj} {noun2} {verb} {prep} the {place} as {det3} {adj2} {noun3} waits this {time}",
]


def make_captions(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(captions, copy (m,), source (m,)): captions[copy[i]] is a one-edit variant of captions[source[i]]."""
    rng = np.random.default_rng(seed)
    cols = {}
    for key, words in _SLOTS.items():
        for suffix in ("", "2", "3"):
            cols[key + suffix] = np.asarray(words)[rng.integers(0, len(words), n)]
    template = rng.integers(0, len(_TEMPLATES), n)
    captions = [_TEMPLATES[t].format(**{k: v[i] for k, v in cols.items()}) for i, t in enumerate(template.tolist())]
    m = int(n * PLANTED)
    picks = rng.choice(n, 2 * m, replace=False)
    source, copy = np.sort(picks[:m]), picks[m:]
    edits = rng.integers(0, 3, m)
    for s, c, e in zip(source.tolist(), copy.tolist(), edits.tolist()):
        text = captions[s]
        if e == 0:
            text = text + " " + str(_SLOTS["noun"][int(rng.integers(len(_SLOTS["noun"])))])
        elif e == 1:
            text = text.rsplit(" ", 1)[0]
        else:
            text = text.capitalize().replace(" in the ", ", in the ") + "."
        captions[c] = text
    return captions, copy, source


def recall_precision(dup_of: np.ndarray, copy: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """Recall: planted pairs with one side removed; precision: removed points that belong to a planted pair."""
    removed = dup_of >= 0
    recall = float(np.mean(removed[copy] | removed[source]))
    planted = np.zeros(len(dup_of), dtype=bool)
    planted[copy] = planted[source] = True
    precision = float(planted[removed].mean()) if removed.any() else 1.0
    return recall, precision


def bench_semantic(n: int, keep: str) -> dict:
    from curation.dedup.semantic import semantic_dedup

    x, copy, source = make_embeddings(n)
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = semantic_dedup(x, EPS, keep=keep, seed=0)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    recall, precision = recall_precision(result.dup_of, copy, source)
    del x
    return {
        "n": n,
        "clusters": result.clusters,
        "seconds": seconds,
        **result.timings,
        "removed": int((result.dup_of >= 0).sum()),
        "recall": recall,
        "precision": precision,
        "traced_peak_gib": peak / 2**30,
        "rss_peak_gib": rss_gib(),
    }


def minhash_over_ray(captions: list[str], params, threshold: float, tasks: int) -> tuple[np.ndarray, dict]:
    """Signatures in ``tasks`` Ray tasks (contiguous slices), LSH and keep-first on the driver."""
    import ray

    from curation.dedup.groups import keep_first
    from curation.dedup.minhash import near_duplicate_pairs, signatures

    timings = {}
    t0 = time.perf_counter()
    remote = ray.remote(num_cpus=1)(signatures)
    bounds = np.linspace(0, len(captions), tasks + 1).astype(int)
    refs = [remote.remote(captions[lo:hi], params) for lo, hi in zip(bounds[:-1], bounds[1:])]
    sig = np.concatenate(ray.get(refs))
    timings["signatures_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    pairs, sim = near_duplicate_pairs(sig, params, threshold)
    dup_of, _ = keep_first(len(captions), pairs, 1.0 - sim)
    timings["lsh_s"] = time.perf_counter() - t1
    return dup_of, timings


def bench_minhash(n: int, tasks: int) -> dict:
    from curation.dedup.minhash import MinHashParams

    captions, copy, source = make_captions(n)
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    dup_of, timings = minhash_over_ray(captions, MinHashParams(), 0.7, tasks)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    recall, precision = recall_precision(dup_of, copy, source)
    return {
        "n": n,
        "seconds": seconds,
        **timings,
        "removed": int((dup_of >= 0).sum()),
        "recall": recall,
        "precision": precision,
        "traced_peak_gib": peak / 2**30,
        "rss_peak_gib": rss_gib(),
    }


def report(title: str, rows: list[dict], budget_s: float) -> None:
    print(f"\n{title}")
    for r in rows:
        extra = "  ".join(f"{k}={v:.1f}" for k, v in r.items() if k.endswith("_s") and k not in ("seconds",))
        print(
            f"  n={r['n']:>9,}  {r['seconds']:7.1f} s  ({r['n'] / r['seconds']:>9,.0f}/s)  {extra}  "
            f"removed={r['removed']:,}  recall={r['recall']:.4f}  precision={r['precision']:.4f}  "
            f"traced_peak={r['traced_peak_gib']:.2f} GiB  driver_rss_peak={r['rss_peak_gib']:.2f} GiB"
            + (f"  clusters={r['clusters']}" if "clusters" in r else "")
        )
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = (b["seconds"] / a["seconds"]) / (b["n"] / a["n"])
        print(
            f"  {b['n'] // a['n']}x the data took {b['seconds'] / a['seconds']:.1f}x the time "
            f"(time per item x{growth:.2f}; 1.00 = linear)"
        )
    biggest = rows[-1]
    if biggest["n"] >= 1_000_000:
        verdict = "within" if biggest["seconds"] <= budget_s else "OVER"
        print(f"  {biggest['n']:,} in {biggest['seconds']:.1f} s: {verdict} the {budget_s:.0f} s budget")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated sizes, smallest first")
    parser.add_argument("--only", choices=("semantic", "minhash"), default=None)
    parser.add_argument("--keep", default="hardest", choices=("hardest", "easiest", "random"))
    parser.add_argument("--cpus", type=int, default=None, help="Ray CPUs (default: all)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    print(f"dedup benchmark: {cpus} CPUs, sizes {sizes}, numpy {np.__version__}")
    try:
        if args.only in (None, "semantic"):
            rows = [bench_semantic(n, args.keep) for n in sizes]
            report(f"SemDeDup, {DIM}-d, eps={EPS}, keep={args.keep} (k-means + pairwise in clusters over Ray)", rows,
                   180.0)  # fmt: skip
        if args.only in (None, "minhash"):
            rows = [bench_minhash(n, cpus) for n in sizes]
            report(f"MinHash LSH, 5-grams, 14 bands x 8 rows, threshold 0.7 ({cpus} Ray tasks for signatures)", rows,
                   300.0)  # fmt: skip
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
