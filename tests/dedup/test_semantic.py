"""SemDeDup: planted near-duplicate embeddings are removed under every keep rule, the keep rules keep the point
they promise, and the Ray path agrees with the in-process one."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup.semantic import auto_clusters, brute_force, cluster_duplicates, semantic_dedup


def embeddings(n: int = 3000, d: int = 32, topics: int = 12, copies: int = 60, seed: int = 0):
    """Clustered unit vectors; ``copies`` points are near-copies (cosine > 0.999) of others. Returns (x, pairs)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d))
    x = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, d)) * 0.6
    picks = rng.choice(n, 2 * copies, replace=False)
    x[picks[copies:]] = x[picks[:copies]] + rng.standard_normal((copies, d)) * 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), list(zip(picks[:copies].tolist(), picks[copies:].tolist()))


@pytest.mark.quick
@pytest.mark.parametrize("keep", ["hardest", "easiest", "random"])
def test_planted_pairs_are_found_with_each_keep_rule(keep):
    x, planted = embeddings()
    eps = 0.005
    assert {tuple(sorted(p)) for p in planted} == brute_force(x, eps)  # nothing else is that close
    res = semantic_dedup(x, eps, keep=keep, clusters=8, seed=1, tasks=1)
    removed = set(np.flatnonzero(res.dup_of >= 0).tolist())
    assert len(removed) == len(planted)
    for a, b in planted:
        assert (a in removed) != (b in removed)  # exactly one of each pair goes
        loser, winner = (a, b) if a in removed else (b, a)
        assert res.dup_of[loser] == winner and res.dup_of[winner] == -1
        assert res.similarity[loser] > 1 - eps


@pytest.mark.quick
def test_keep_rules_keep_the_hardest_or_easiest_copy():
    rng = np.random.default_rng(3)
    d = 16
    centre = np.zeros(d)
    centre[0] = 1.0
    spread = centre + rng.standard_normal((200, d)) * 0.5
    base = rng.standard_normal(d) * 0.5 + centre
    # three near-copies, pulled ever further from the centre of the (single) cluster
    trio = np.stack([base + t * (base - centre) for t in (0.0, 0.02, 0.04)])
    x = np.concatenate([spread, trio])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float32)
    ids = [200, 201, 202]
    for keep, survivor in (("hardest", 202), ("easiest", 200)):
        res = semantic_dedup(x, 0.01, keep=keep, clusters=1, tasks=1)
        kept = [i for i in ids if res.dup_of[i] == -1]
        assert kept == [survivor], (keep, kept)
        assert all(res.dup_of[i] == survivor for i in ids if i != survivor)


@pytest.mark.quick
def test_chains_point_at_the_survivor():
    # a ~ b ~ c but a !~ c: the paper's rule removes b and c (each is close to an earlier point), and both name a
    x = np.array([[1.0, 0.0], [np.cos(0.1), np.sin(0.1)], [np.cos(0.2), np.sin(0.2)]], dtype=np.float32)
    earlier, _ = cluster_duplicates(x, eps=1 - np.cos(0.15))
    assert earlier.tolist() == [-1, 0, 1]
    res = semantic_dedup(x, 1 - np.cos(0.15), keep="random", clusters=1, tasks=1)
    assert sorted(res.dup_of.tolist()).count(-1) == 1
    root = int(np.flatnonzero(res.dup_of == -1)[0])
    assert all(r in (-1, root) for r in res.dup_of.tolist())


@pytest.mark.quick
def test_cluster_blocks_agree_with_one_block(monkeypatch):
    from curation.dedup import semantic

    x, _ = embeddings(600, copies=30, seed=2)
    whole = cluster_duplicates(x, 0.01)
    monkeypatch.setattr(semantic, "_BLOCK", 7)
    blocked = cluster_duplicates(x, 0.01)
    assert (whole[0] == blocked[0]).all() and np.allclose(whole[1], blocked[1])


@pytest.mark.quick
def test_auto_clusters():
    assert auto_clusters(50) == 1
    assert auto_clusters(20_000) == 200
    assert auto_clusters(1_000_000) == 1000
    assert auto_clusters(5_000_000) == 5000


@pytest.mark.slow
def test_ray_tasks_agree_with_one_process(ray_session):
    x, planted = embeddings(4000, copies=80, seed=4)
    local = semantic_dedup(x, 0.005, keep="hardest", clusters=10, seed=0, tasks=1)
    remote = semantic_dedup(x, 0.005, keep="hardest", clusters=10, seed=0, tasks=2)
    assert (local.dup_of == remote.dup_of).all()
    assert int((remote.dup_of >= 0).sum()) == len(planted)
