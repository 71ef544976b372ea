"""Dedup at scale: SemDeDup over synthetic embeddings and MinHash over synthetic captions, at several sizes in one
run, so the growth of each cost can be read off side by side, and MinHash beside datatrove's in the same run.

    .venv/bin/python benchmarks/dedup.py                       # 100k and 1M of each (a few minutes on 2 cores)
    .venv/bin/python benchmarks/dedup.py --sizes 20000,100000  # quicker
    .venv/bin/python benchmarks/dedup.py --only minhash --no-peer

Data are generated inside the benchmark, with planted duplicates so recall (and precision) can be printed:

- embeddings: 512-d, clustered Gaussian (2000 topics; two points of one topic have cosine ~0.5), L2-normalised;
  1% of the points are copies of another point plus a small perturbation (cosine >= 0.995).
- captions: templated sentences (~16-22 words, eight slots from word lists); 1% are copies of another caption
  with one edit (a word appended or dropped at the end, or case and punctuation changed).

Timing is wall clock (time.perf_counter) on a local Ray instance with the machine's CPUs; the data generation is
not timed. Memory: the driver's peak RSS during the timed section (sampled every 10 ms; in brackets, its growth
over the section's start), and tracemalloc's peak of the section (numpy buffers included); Ray workers' memory is not in these (they read the embeddings zero-copy from
the object store).

The peer, for MinHash: datatrove's own pipeline (``MinhashDedupSignature``, ``MinhashDedupBuckets``,
``MinhashDedupCluster`` on its ``LocalPipelineExecutor``, one task a CPU for the signatures, a task a bucket after)
over the same captions, with the same 5-grams and 14 bands of 8 hashes, 64-bit. Two adapters, because its defaults
do not run here: its English word tokenizer needs spaCy, so it gets a whitespace split, which is what ours does;
its xxhash call passes ``str``, which xxhash 4 refuses, so it gets the same xxhash64 of the UTF-8 bytes. Its
documents are made in its tasks from the captions in memory; its signatures, buckets and duplicate lists go
through files in a temporary folder, as they do in a real run. The ratio is datatrove's seconds over ours.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DIM = 512
TOPICS = 2000
PLANTED = 0.01
EPS = 0.01  # remove above cosine 0.99


@contextmanager
def peak_rss(out: dict):
    """Sample this process's RSS every 10 ms while the block runs; ``out["rss_peak_gib"]`` is the largest,
    ``out["rss_start_gib"]`` the first. (The process's own peak, ``ru_maxrss``, cannot be reset, so a later section
    would report an earlier one's.)"""
    import os

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    start = rss()
    peak, done = [start], threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out["rss_peak_gib"], out["rss_start_gib"] = max(peak[0], rss()) / 2**30, start / 2**30


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
    memory: dict = {}
    tracemalloc.start()
    with peak_rss(memory):
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
        **memory,
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


class _Captions:
    """datatrove's first pipeline step: the documents of one task's contiguous slice of the captions."""

    def __init__(self, captions: list[str], bounds: np.ndarray):
        self.captions, self.bounds = captions, bounds

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document

        for i in range(self.bounds[rank], self.bounds[rank + 1]):
            yield Document(text=self.captions[i], id=str(i))


@contextmanager
def quiet(path: Path):
    """Send this process's and its children's stdout and stderr to ``path`` while the block runs."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def _xxhash64(text: str) -> int:
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def datatrove_minhash(captions: list[str], tasks: int, work: Path) -> tuple[np.ndarray, dict]:
    """datatrove's MinHash dedup over ``captions`` (see the module's notes); (dup_of, timings), ``dup_of`` >= 0 for
    the captions it removes."""
    import datatrove.pipeline.dedup.minhash as dt_minhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitWords(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    config = dt_minhash.MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(64))
    loader, dt_minhash.load_word_tokenizer = dt_minhash.load_word_tokenizer, lambda language: SplitWords()
    try:
        signature = dt_minhash.MinhashDedupSignature(output_folder=str(work / "signatures"), config=config)
    finally:
        dt_minhash.load_word_tokenizer = loader
    signature._hash_func = _xxhash64
    bounds = np.linspace(0, len(captions), tasks + 1).astype(int)
    steps = {
        "signatures_s": ([_Captions(captions, bounds), signature], tasks),
        "buckets_s": (
            [dt_minhash.MinhashDedupBuckets(str(work / "signatures"), str(work / "buckets"), config=config)],
            config.num_buckets,
        ),
        "cluster_s": (
            [dt_minhash.MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)],
            1,
        ),
    }
    timings = {}
    with quiet(work / "output.log"):  # its per-task logs and progress bars
        for name, (pipeline, n_tasks) in steps.items():
            t0 = time.perf_counter()
            LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(tasks, n_tasks),
                                  logging_dir=str(work / "logs" / name)).run()  # fmt: skip
            timings[name] = time.perf_counter() - t0
    dup_of = np.full(len(captions), -1, dtype=np.int64)
    for rank in range(tasks):
        path = work / "remove" / f"{rank:06d}.remove"
        if path.is_file():  # the document indices within the task's slice
            dup_of[bounds[rank] + np.frombuffer(path.read_bytes(), "<u4").astype(np.int64)] = 0
    return dup_of, timings


def bench_minhash(n: int, tasks: int, peer: bool) -> dict:
    from curation.dedup.minhash import MinHashParams

    captions, copy, source = make_captions(n)
    gc.collect()
    memory: dict = {}
    tracemalloc.start()
    with peak_rss(memory):
        t0 = time.perf_counter()
        dup_of, timings = minhash_over_ray(captions, MinHashParams(), 0.7, tasks)
        seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    recall, precision = recall_precision(dup_of, copy, source)
    row = {
        "n": n,
        "seconds": seconds,
        **timings,
        "removed": int((dup_of >= 0).sum()),
        "recall": recall,
        "precision": precision,
        "traced_peak_gib": peak / 2**30,
        **memory,
    }
    if peer:
        work = Path(tempfile.mkdtemp(prefix="bench-dedup-datatrove-"))
        try:
            t0 = time.perf_counter()
            peer_dup_of, peer_timings = datatrove_minhash(captions, tasks, work)
            peer_seconds = time.perf_counter() - t0
        finally:
            shutil.rmtree(work, ignore_errors=True)
        peer_recall, peer_precision = recall_precision(peer_dup_of, copy, source)
        row["peer"] = {
            "n": n,
            "seconds": peer_seconds,
            **peer_timings,
            "removed": int((peer_dup_of >= 0).sum()),
            "recall": peer_recall,
            "precision": peer_precision,
        }
    return row


def _row(label: str, r: dict) -> str:
    extra = "  ".join(f"{k}={v:.1f}" for k, v in r.items() if k.endswith("_s") and k not in ("seconds",))
    memory = (f"  traced_peak={r['traced_peak_gib']:.2f} GiB  driver_rss_peak={r['rss_peak_gib']:.2f} GiB "
              f"(+{r['rss_peak_gib'] - r['rss_start_gib']:.2f})" if "rss_peak_gib" in r else "")  # fmt: skip
    return (
        f"  {label:<11}n={r['n']:>9,}  {r['seconds']:7.1f} s  ({r['n'] / r['seconds']:>9,.0f}/s)  {extra}  "
        f"removed={r['removed']:,}  recall={r['recall']:.4f}  precision={r['precision']:.4f}{memory}"
        + (f"  clusters={r['clusters']}" if "clusters" in r else "")
    )


def report(title: str, rows: list[dict], budget_s: float) -> None:
    print(f"\n{title}")
    for r in rows:
        print(_row("ours", r))
        if "peer" in r:
            print(_row("datatrove", r["peer"]))
            print(f"  {'':<11}datatrove / ours: {r['peer']['seconds'] / r['seconds']:.1f}x the time")
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
    parser.add_argument("--no-peer", action="store_true", help="skip datatrove's MinHash pipeline (the peer)")
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
            rows = [bench_minhash(n, cpus, not args.no_peer) for n in sizes]
            report(f"MinHash LSH, 5-grams, 14 bands x 8 rows, threshold 0.7 ({cpus} Ray tasks for signatures)", rows,
                   300.0)  # fmt: skip
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
