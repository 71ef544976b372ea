"""Semantic deduplication (SemDeDup, Abbas et al. 2023) over L2-normalised embeddings.

1. Spherical k-means with faiss (on a GPU when faiss sees one), trained on a sample of at most
   ``max_points_per_centroid`` points per centroid, then every point assigned to its nearest centroid.
2. Within each cluster, points are ordered by the keep rule, and a point is removed when its cosine similarity to
   an *earlier* point of that order exceeds ``1 - eps`` (the paper's rule: max over the upper triangle of the
   cluster's similarity matrix). Keep rules, as in the paper: ``hardest`` keeps the point farthest from the
   centroid (least prototypical), ``easiest`` the closest, ``random`` a seeded random one.
3. ``dup_of`` is the earlier point it was most similar to, followed to the survivor of its chain.

Cost: k-means is ``O(k * sample)`` per iteration plus ``O(n * k)`` to assign; the pairwise step is
``O(sum of cluster size**2)``, computed in row blocks so memory stays ``O(block * cluster size)``. Clusters are
spread over Ray tasks (balanced by their pairwise cost) when Ray is running.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np

from curation.dedup.groups import resolve_roots

log = logging.getLogger("curation")
KEEP_RULES = ("hardest", "easiest", "random")
_BLOCK = 2048


class SemanticResult(NamedTuple):
    """``dup_of`` (n,) int64 (-1: kept) pointing at a survivor; ``similarity`` (n,) to the point it was removed
    for (NaN when kept); ``labels`` (n,) cluster of each point; ``clusters`` the k used; ``timings`` seconds of
    ``kmeans_s`` and ``pairwise_s``."""

    dup_of: np.ndarray
    similarity: np.ndarray
    labels: np.ndarray
    clusters: int
    timings: dict


def auto_clusters(n: int) -> int:
    """About 1000 clusters, more once clusters would pass ~1000 points (pairwise cost grows with their square),
    fewer for small inputs so a cluster holds at least ~100 points."""
    return int(max(1, min(max(1000, n // 1000), n // 100)))


def kmeans(
    x: np.ndarray, k: int, iterations: int = 20, seed: int = 0, max_points_per_centroid: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means; returns (labels (n,) int64, cosine similarity of each point to its centroid (n,))."""
    import faiss

    n, d = x.shape
    if k <= 1:
        centroid = x.mean(axis=0)
        centroid /= max(np.linalg.norm(centroid), 1e-12)
        return np.zeros(n, dtype=np.int64), x @ centroid
    km = faiss.Kmeans(
        d,
        k,
        niter=iterations,
        seed=seed,
        spherical=True,
        max_points_per_centroid=max_points_per_centroid,
        gpu=faiss.get_num_gpus() > 0,
        verbose=False,
    )
    km.train(x)
    sim, labels = km.index.search(x, 1)
    return labels[:, 0].astype(np.int64), sim[:, 0]


def cluster_duplicates(x: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The paper's rule on one cluster whose rows are already in keep order: for each row, the most similar
    earlier row and that similarity; rows with similarity > 1 - eps are duplicates. Returns (earlier (m,) int64,
    -1 when none qualifies; similarity (m,))."""
    m = x.shape[0]
    best = np.full(m, -1, dtype=np.int64)
    best_sim = np.full(m, -np.inf, dtype=np.float32)
    for lo in range(1, m, _BLOCK):
        hi = min(m, lo + _BLOCK)
        sims = x[lo:hi] @ x[:hi].T  # rows lo..hi against every row before them (and the block itself)
        rows = np.arange(lo, hi)[:, None]
        sims[np.arange(hi)[None, :] >= rows] = -np.inf  # only earlier rows count
        arg = sims.argmax(axis=1)
        best[lo:hi], best_sim[lo:hi] = arg, sims[np.arange(hi - lo), arg]
    dup = best_sim > 1.0 - eps
    return np.where(dup, best, -1), best_sim


def _clusters_task(x: np.ndarray, bounds: list[tuple[int, int]], eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Run :func:`cluster_duplicates` on consecutive row ranges of ``x``; indices are made global."""
    earlier = np.full(x.shape[0], -1, dtype=np.int64)
    sim = np.full(x.shape[0], np.nan, dtype=np.float32)
    for lo, hi in bounds:
        e, s = cluster_duplicates(x[lo:hi], eps)
        earlier[lo:hi] = np.where(e >= 0, e + lo, -1)
        sim[lo:hi] = s
    return earlier, sim


def _balanced_groups(sizes: np.ndarray, parts: int) -> list[list[int]]:
    """Split cluster indices into ``parts`` groups of about equal pairwise cost (size**2), largest first."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = np.zeros(parts)
    for c in np.argsort(-(sizes.astype(np.float64) ** 2), kind="stable"):
        g = int(load.argmin())
        groups[g].append(int(c))
        load[g] += float(sizes[c]) ** 2
    return [g for g in groups if g]


def semantic_dedup(
    x: np.ndarray,
    eps: float,
    keep: str = "hardest",
    clusters: int | None = None,
    seed: int = 0,
    iterations: int = 20,
    max_points_per_centroid: int = 256,
    tasks: int | None = None,
) -> SemanticResult:
    """SemDeDup over ``x`` (n, d) float32, rows L2-normalised. ``tasks``: Ray tasks for the pairwise step
    (``None``: the cluster's CPUs when Ray is running, else in-process)."""
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {KEEP_RULES}, got {keep!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        empty = np.empty(0, dtype=np.int64)
        return SemanticResult(empty, np.empty(0), empty, 0, {})
    k = min(clusters or auto_clusters(n), n)
    t0 = time.perf_counter()
    labels, centroid_sim = kmeans(x, k, iterations, seed, max_points_per_centroid)
    t1 = time.perf_counter()
    # keep order inside each cluster: the first of a duplicate set in this order survives
    if keep == "hardest":
        within = centroid_sim  # least similar to the centroid first
    elif keep == "easiest":
        within = -centroid_sim
    else:
        within = np.random.default_rng(seed).random(n)
    order = np.lexsort((np.arange(n), within, labels))
    xs = x[order]
    sizes = np.bincount(labels, minlength=k)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    bounds = [(int(starts[c]), int(starts[c] + sizes[c])) for c in range(k) if sizes[c] > 1]
    earlier_sorted, sim_sorted = _run_clusters(xs, bounds, sizes[sizes > 1], eps, tasks)
    # back to input positions
    dup_of = np.full(n, -1, dtype=np.int64)
    has = earlier_sorted >= 0
    dup_of[order[has]] = order[earlier_sorted[has]]
    similarity = np.full(n, np.nan)
    similarity[order[has]] = sim_sorted[has]
    timings = {"kmeans_s": t1 - t0, "pairwise_s": time.perf_counter() - t1}
    return SemanticResult(resolve_roots(dup_of), similarity, labels, k, timings)


def _run_clusters(
    xs: np.ndarray, bounds: list[tuple[int, int]], sizes: np.ndarray, eps: float, tasks: int | None
) -> tuple[np.ndarray, np.ndarray]:
    import ray

    use_ray = ray.is_initialized() and tasks != 1 and len(bounds) > 1
    if not use_ray:
        return _clusters_task(xs, bounds, eps)
    parts = tasks or max(1, int(ray.cluster_resources().get("CPU", 1)))
    groups = _balanced_groups(sizes, parts)
    ref = ray.put(xs)  # one copy in the object store, read zero-copy by every task
    remote = ray.remote(num_cpus=1)(_clusters_task)
    futures = [remote.remote(ref, [bounds[c] for c in sorted(g)], eps) for g in groups]
    earlier = np.full(xs.shape[0], -1, dtype=np.int64)
    sim = np.full(xs.shape[0], np.nan, dtype=np.float32)
    for e, s in ray.get(futures):
        has = ~np.isnan(s)
        earlier[has], sim[has] = e[has], s[has]
    return earlier, sim


def brute_force(x: np.ndarray, eps: float) -> set[tuple[int, int]]:
    """Every pair (i < j) with cosine similarity > 1 - eps (for tests)."""
    sims = x @ x.T
    i, j = np.triu_indices(x.shape[0], 1)
    hit = sims[i, j] > 1.0 - eps
    return set(zip(i[hit].tolist(), j[hit].tolist()))
