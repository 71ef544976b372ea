"""Deduplication algorithms, one module per level; the dedup stage (curation/stages/dedup.py) wires them up.

- :mod:`~curation.dedup.exact`: equal media bytes and normalised-caption keys, grouped over Ray.
- :mod:`~curation.dedup.perceptual`: image pHash, video frame pHash, audio spectral fingerprint; banded Hamming
  search confirmed by a colour/texture profile.
- :mod:`~curation.dedup.semantic`: SemDeDup (faiss k-means, then pairwise cosine within clusters, over Ray).
- :mod:`~curation.dedup.minhash`: caption MinHash LSH in datatrove's scheme, vectorised with numpy.
- :mod:`~curation.dedup.decontaminate`: matches against an evaluation set.
- :mod:`~curation.dedup.groups`: from duplicate pairs to survivors (first in input order stays).
"""

from curation.dedup.decontaminate import find_contaminated, load_reference
from curation.dedup.exact import caption_sha256, first_copies, first_copies_ray, normalize_captions
from curation.dedup.groups import keep_first, resolve_roots
from curation.dedup.minhash import MinHashParams, near_duplicate_pairs, signatures
from curation.dedup.perceptual import Fingerprint, FingerprintError, Thresholds, fingerprint, near_duplicates
from curation.dedup.semantic import KEEP_RULES, SemanticResult, semantic_dedup

__all__ = [
    "KEEP_RULES",
    "Fingerprint",
    "FingerprintError",
    "MinHashParams",
    "SemanticResult",
    "Thresholds",
    "caption_sha256",
    "find_contaminated",
    "fingerprint",
    "first_copies",
    "first_copies_ray",
    "keep_first",
    "load_reference",
    "near_duplicate_pairs",
    "near_duplicates",
    "normalize_captions",
    "resolve_roots",
    "semantic_dedup",
    "signatures",
]
