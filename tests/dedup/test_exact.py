"""Exact duplicates and caption keys."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup.exact import caption_sha256, first_copies, first_copies_ray, normalize_captions


@pytest.mark.quick
def test_first_copy_in_input_order_survives():
    keys = ["a", "b", "a", None, "b", "a", None, "c"]
    assert first_copies(keys).tolist() == [-1, -1, 0, -1, 1, 0, -1, -1]


@pytest.mark.quick
def test_caption_keys_ignore_case_accents_punctuation_digits_and_spacing():
    same = ["A Café, 2 floors up!", "a cafe 3 floors up", "  A  CAFÉ — 10.5 FLOORS UP..."]
    assert len(set(caption_sha256(same))) == 1
    assert caption_sha256(["a red circle"]) != caption_sha256(["a red square"])
    assert normalize_captions(["Hello_World", None, "x\x1ey"]) == ["hello world", "", "x y"]


@pytest.mark.slow
def test_ray_grouping_equals_one_process(ray_session):
    rng = np.random.default_rng(0)
    keys = [f"{k:064x}" if k % 11 else None for k in rng.integers(0, 500, 3000).tolist()]
    for parts in (1, 3, None):
        assert (first_copies_ray(keys, parts) == first_copies(keys)).all()
