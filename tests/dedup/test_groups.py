"""From duplicate pairs to survivors: the keep-first rule and chain resolution."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup.groups import keep_first, resolve_roots

pytestmark = pytest.mark.quick


def test_first_in_input_order_survives_and_dup_of_names_a_survivor():
    dup, dist = keep_first(5, np.array([[3, 1], [1, 0], [4, 3]]), np.array([0.2, 0.1, 0.3]))
    assert dup.tolist() == [-1, 0, -1, -1, 3]  # 3 matched only 1, which was dropped: 3 stays, and takes 4
    assert np.isnan(dist[0]) and dist[1] == 0.1


def test_the_closest_earlier_survivor_is_named():
    dup, _ = keep_first(4, np.array([[0, 3], [1, 3], [2, 3]]), np.array([0.5, 0.1, 0.3]))
    assert dup.tolist() == [-1, -1, -1, 1]


def test_no_pairs_keeps_everything():
    dup, dist = keep_first(3, np.empty((0, 2), dtype=np.int64))
    assert dup.tolist() == [-1, -1, -1] and np.isnan(dist).all()


def test_resolve_roots_follows_chains():
    assert resolve_roots(np.array([-1, 0, 1, 2, -1, 4])).tolist() == [-1, 0, 0, 0, -1, 4]
