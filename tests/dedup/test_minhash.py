"""MinHash LSH over captions: near-identical captions are found, others are not, and the vectorised scheme is
consistent (normalisation, short captions, chunking)."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup.groups import keep_first
from curation.dedup.minhash import (
    EMPTY,
    MinHashParams,
    candidate_pairs,
    near_duplicate_pairs,
    shingle_hashes,
    signatures,
    similarity,
)

pytestmark = pytest.mark.quick

WORDS = ("harbor lantern violet meadow copper falcon ember glacier orchard velvet summit willow canyon marble "
         "thistle beacon quartz saffron drift cobalt prairie lagoon ember tundra cedar basalt heron juniper").split()  # fmt: skip


def sentences(n: int, length: int = 20, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, length)) for _ in range(n)]


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa = {" ".join(a.split()[i : i + n]) for i in range(len(a.split()) - n + 1)}
    sb = {" ".join(b.split()[i : i + n]) for i in range(len(b.split()) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_near_duplicate_captions_are_found_and_unrelated_ones_are_not():
    texts = sentences(400)
    planted = {}
    for i in range(0, 400, 10):  # one word appended, or the last word dropped: Jaccard about 0.85-0.95
        texts[i + 1] = texts[i] + " harbor" if i % 20 else texts[i].rsplit(" ", 1)[0]
        planted[i + 1] = i
    pairs, sim = near_duplicate_pairs(signatures(texts), MinHashParams(), threshold=0.7)
    found = {int(b): int(a) for a, b in pairs.tolist()}
    assert found == planted
    assert sim.min() >= 0.7


def test_similarity_estimates_jaccard():
    a = sentences(1, 40, seed=1)[0]
    words = a.split()
    for cut in (2, 6, 12):  # replace the last `cut` words
        b = " ".join(words[:-cut] + sentences(1, cut, seed=cut)[0].split())
        sig = signatures([a, b])
        est = float(similarity(sig, np.array([0]), np.array([1]))[0])
        assert abs(est - jaccard(a, b)) < 0.12, (cut, est, jaccard(a, b))


def test_case_punctuation_accents_and_digits_do_not_matter():
    texts = ["A café, on floor 2: open late!", "a cafe on floor 3 open late", "A CAFÉ ON FLOOR 10.5; OPEN LATE..."]
    sig = signatures(texts)
    assert (sig[0] == sig[1]).all() and (sig[0] == sig[2]).all()


def test_short_captions_match_only_when_equal():
    texts = ["a red circle", "a red circle", "a blue circle", "circle"]
    pairs, _ = near_duplicate_pairs(signatures(texts), MinHashParams(), threshold=0.7)
    assert pairs.tolist() == [[0, 1]]
    h, start = shingle_hashes(texts)
    assert np.diff(start).tolist() == [1, 1, 1, 1]  # one shingle of all words each


def test_empty_captions_never_match():
    sig = signatures(["", None, "   ", "words here"])
    assert (sig[:3] == EMPTY).all()
    assert len(candidate_pairs(sig, MinHashParams())) == 0


def test_signatures_do_not_depend_on_chunking_or_batch():
    texts = sentences(300, seed=4) + ["x y"] * 3
    full = signatures(texts)
    assert (signatures(texts, chunk=64) == full).all()
    assert (signatures(texts[100:200]) == full[100:200]).all()
    assert full.shape == (len(texts), 14 * 8) and full.dtype == np.uint32


def test_other_schemes_change_the_signature_shape():
    params = MinHashParams(ngram=3, bands=20, rows=5, seed=2)
    sig = signatures(sentences(5), params)
    assert sig.shape == (5, 100)


def test_a_bucket_of_copies_keeps_the_first():
    texts = sentences(50, seed=5)
    texts[10] = texts[30] = texts[45] = texts[3]
    pairs, sim = near_duplicate_pairs(signatures(texts), MinHashParams())
    dup_of, _ = keep_first(len(texts), pairs, 1 - sim)
    assert {i: int(d) for i, d in enumerate(dup_of) if d >= 0} == {10: 3, 30: 3, 45: 3}
