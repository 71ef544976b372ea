"""Caption near-duplicates: MinHash signatures and banded LSH, vectorised with numpy.

The scheme is datatrove's (``MinhashDedupSignature`` and friends): normalised text (lower case, accents folded,
numbers and punctuation normalised), word n-grams (5 by default), ``bands`` x ``rows`` min-hashes (14 x 8), and
documents that agree on every min-hash of some band become candidates. What differs, so a million captions take
seconds instead of minutes:

- Words are split on whitespace after normalisation (datatrove uses a language-aware word tokenizer).
- Each distinct word is hashed once (blake2b, 64 bit); an n-gram's hash is a splitmix64 chain over its word hashes,
  computed for all n-grams of a batch at once in numpy uint64 arithmetic (datatrove hashes every n-gram string
  with sha1 or xxhash in Python).
- The min-hash permutations are multiply-shift hashes ``(a * h + b) >> 32`` mod 2**64 with odd ``a`` (a
  2-universal family), giving 32-bit values; datatrove uses ``(a * h + b) mod (2**61 - 1)``. Same estimator.
- A caption shorter than n words becomes one shingle of all its words, so short captions still match exactly.
- Candidates are verified: a pair counts only when the signatures agree on at least ``threshold`` of all
  min-hashes (the Jaccard estimate); datatrove keeps every LSH collision.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np

from curation.dedup.exact import normalize_captions

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
EMPTY = np.uint32(0xFFFFFFFF)  # the signature value of a caption with no words: never matches


class MinHashParams(NamedTuple):
    """The scheme: word n-gram size, LSH bands x rows per band, and the seed of the permutations."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche on uint64 (wrapping arithmetic is intended)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _permutations(params: MinHashParams) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(params.seed)
    a = rng.integers(0, 2**63, size=params.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=params.num_perm, dtype=np.uint64)
    return a, b


def shingle_hashes(texts: list[str | None], ngram: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word n-grams of every text: (hashes (S,) uint64, doc_start (n+1,) offsets into hashes)."""
    norm = normalize_captions(texts)
    lengths = np.fromiter(map(len, map(str.split, norm)), dtype=np.int64, count=len(norm))
    words = " ".join(norm).split()
    # dict.fromkeys and map() iterate in C: ids for a million captions in a few seconds
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    flat = np.fromiter(map(vocab.__getitem__, words), dtype=np.int64, count=len(words))
    word_hash = np.fromiter(map(_word_hash, vocab), dtype=np.uint64, count=len(vocab))
    tokens = word_hash[flat]
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    # n-grams per doc: len - n + 1, or one (all words) for a short non-empty doc
    counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
    doc_start = np.r_[0, np.cumsum(counts)]
    doc_of = np.repeat(np.arange(len(norm)), counts)
    pos = starts[doc_of] + (np.arange(doc_start[-1]) - doc_start[:-1][doc_of])
    width = np.minimum(lengths[doc_of], ngram)
    h = np.full(pos.shape, _GOLDEN, dtype=np.uint64)
    for k in range(ngram):  # chain the words of each n-gram in order: "a b" and "b a" hash apart
        use = k < width
        h[use] = _mix((h[use] * _GOLDEN) ^ tokens[pos[use] + k])
    return h, doc_start


def signatures(texts: list[str | None], params: MinHashParams = MinHashParams(), chunk: int = 1 << 20) -> np.ndarray:
    """MinHash signatures, (n, bands*rows) uint32; an empty caption's row is all :data:`EMPTY`."""
    h, doc_start = shingle_hashes(texts, params.ngram)
    n = len(doc_start) - 1
    a, b = _permutations(params)
    sig = np.full((params.num_perm, n), EMPTY, dtype=np.uint32)  # permutation-major: each write is contiguous
    has = np.flatnonzero(np.diff(doc_start) > 0)
    if not len(has):
        return sig.T.copy()
    step = max(1, chunk // max(1, int(doc_start[-1] // len(has))))  # docs per chunk: about `chunk` shingles
    tmp = np.empty(0, dtype=np.uint64)
    for lo in range(0, len(has), step):
        docs = has[lo : lo + step]
        s0, s1 = doc_start[docs[0]], doc_start[docs[-1] + 1]
        part, offs = h[s0:s1], doc_start[docs] - s0
        if tmp.shape != part.shape:
            tmp = np.empty_like(part)
        for j in range(params.num_perm):
            np.multiply(part, a[j], out=tmp)
            np.add(tmp, b[j], out=tmp)
            np.right_shift(tmp, np.uint64(32), out=tmp)
            sig[j, docs] = np.minimum.reduceat(tmp, offs)
    return np.ascontiguousarray(sig.T)


def band_keys(sig: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(n, bands) uint64: one hash per band of ``rows`` min-hashes; equal keys = the band agrees."""
    n = sig.shape[0]
    rows = sig.reshape(n, params.bands, params.rows).astype(np.uint64)
    key = np.full((n, params.bands), _GOLDEN, dtype=np.uint64)
    for r in range(params.rows):
        key = _mix((key * _GOLDEN) ^ rows[:, :, r])
    return key


def similarity(sig: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of the pairs (i, j): the share of equal min-hashes (0 for empty captions)."""
    eq = (sig[i] == sig[j]).mean(axis=1)
    return np.where(sig[i, 0] == EMPTY, 0.0, eq)


def candidate_pairs(sig: np.ndarray, params: MinHashParams) -> np.ndarray:
    """(k, 2) pairs i < j that agree on some band. Within each bucket, members (in input order) are paired with the
    first member and with their predecessor: linear in bucket size, and enough for the keep-first rule."""
    keys = band_keys(sig, params)
    valid = sig[:, 0] != EMPTY
    found = []
    for band in range(params.bands):
        idx = np.flatnonzero(valid)
        k = keys[idx, band]
        order = np.lexsort((idx, k))
        k, members = k[order], idx[order]
        same = k[1:] == k[:-1]
        if not same.any():
            continue
        # run starts, broadcast to every member of the run
        run_start = np.flatnonzero(np.r_[True, ~same])
        first = members[run_start[np.searchsorted(run_start, np.arange(len(members)), side="right") - 1]]
        later = np.flatnonzero(np.r_[False, same])
        found.append(np.stack([first[later], members[later]], axis=1))
        found.append(np.stack([members[later - 1], members[later]], axis=1))
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)
    return pairs[pairs[:, 0] != pairs[:, 1]]


def near_duplicate_pairs(
    sig: np.ndarray, params: MinHashParams = MinHashParams(), threshold: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """LSH candidates verified by the Jaccard estimate: ((k, 2) pairs i < j, (k,) similarity >= threshold)."""
    pairs = candidate_pairs(sig, params)
    if not len(pairs):
        return pairs, np.empty(0)
    sim = similarity(sig, pairs[:, 0], pairs[:, 1])
    keep = sim >= threshold
    return pairs[keep], sim[keep]
