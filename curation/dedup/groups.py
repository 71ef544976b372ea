"""Turning duplicate *pairs* into a decision per record: which copy survives, and whom each other copy duplicates.

The rule, used by the exact, perceptual and caption levels: records are taken in input order; a record is a
duplicate when it matches an *earlier record that survived*, and its ``dup_of`` is the most similar such record
(ties: the earliest). So the first copy in input order always survives, every ``dup_of`` names a survivor, and a
chain A~B~C where A and C differ keeps C when B was dropped for A (no transitive over-merging).
"""

from __future__ import annotations

import numpy as np


def keep_first(n: int, pairs: np.ndarray, distance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Resolve duplicate pairs over ``n`` records given in input order.

    Args:
        n: number of records; index = position in input order.
        pairs: (k, 2) index pairs that match (either order).
        distance: (k,) smaller is more alike; picks ``dup_of`` among several earlier survivors.

    Returns:
        ``dup_of`` (n,) int64: -1 for survivors, else the index of the survivor it duplicates;
        ``dist`` (n,) float64: the distance to that survivor (NaN for survivors).
    """
    dup_of = np.full(n, -1, dtype=np.int64)
    dist_out = np.full(n, np.nan)
    if len(pairs) == 0:
        return dup_of, dist_out
    pairs = np.sort(np.asarray(pairs, dtype=np.int64), axis=1)  # (earlier, later)
    dist = np.zeros(len(pairs)) if distance is None else np.asarray(distance, dtype=np.float64)
    # by later record, then by distance, then by earlier record: the first usable pair of a record wins
    order = np.lexsort((pairs[:, 0], dist, pairs[:, 1]))
    earlier, later, dist = pairs[order, 0], pairs[order, 1], dist[order]
    for a, b, d in zip(earlier.tolist(), later.tolist(), dist.tolist()):
        if dup_of[b] == -1 and dup_of[a] == -1 and a != b:
            # later records are decided after earlier ones (sorted by `later`), so dup_of[a] is final here
            dup_of[b], dist_out[b] = a, d
    return dup_of, dist_out


def resolve_roots(dup_of: np.ndarray) -> np.ndarray:
    """Follow ``dup_of`` chains to the record that survives (for rules that may point at a removed record)."""
    root = dup_of.copy()
    while True:
        has = root >= 0
        nxt = np.where(has, dup_of[np.where(has, root, 0)], -1)
        move = has & (nxt >= 0)
        if not move.any():
            return root
        root[move] = nxt[move]
