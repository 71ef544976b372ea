"""Perceptual fingerprints and near-duplicate search.

A fingerprint has two parts. ``words``: 64-bit hashes (one for an image or audio clip, one per sampled frame of a
video), compared by the mean Hamming distance per word and searched with banding, so candidates cost about
``N * bucket size`` instead of ``N**2``. ``profile``: a small vector that *confirms* a Hamming match, compared by
mean absolute difference. The confirmation is needed because a hash that survives re-encoding is by design blind to
what tells many distinct items apart: pHash thresholds DCT coefficients at their median, so it ignores colour and
contrast (a red and a green square in the same place hash alike), and a coarse energy map of a tone ignores its
exact pitch and timing.

- Image: pHash (greyscale 32x32, 2-D DCT-II, the 64 lowest-frequency AC coefficients, one bit each: above their
  median or not; the DC term, overall brightness, is left out). Profile: an 8x8 RGB thumbnail (0-255), so colour
  counts. Resizing, recompression and crops of a few percent move a few bits and a few levels.
- Video: the same for ``frames`` frames sampled uniformly over the clip (by position, so rescaled and re-encoded
  copies, which keep their frame count and duration, sample the same moments).
- Audio, decoded to 16 kHz mono (blind to the file's rate and container), as band energies in dB on a grid of 32
  log-spaced bands (100 Hz to 7.6 kHz, below every common Nyquist) x 64 equal time segments. Word: an 8x8 energy
  map, one bit per cell within 20 dB of the loudest cell (gain-blind, and the noise floor, which resampling moves,
  sits far below). Profile: the *texture*, the sign of each grid cell minus its 3x3 neighbourhood mean (2048 signs):
  the fine spectro-temporal detail of this particular recording (its noise, its onsets) that a re-encode, gain
  change or resample keeps and another recording of the same sound does not. Profile distance 0 is identical
  texture, 1.0 uncorrelated. Known gap: a copy downsampled *without* an anti-alias filter folds new noise into the
  band and loses most of its texture (broadband noise clips then fall out of reach).

Banding (:func:`hamming_pairs`): each word is split into ``bands`` bit ranges, and only fingerprints that agree
exactly on some band of some word are compared. With ``bands > max_bits`` this finds *every* pair within the
threshold (if the mean over words is <= t, some word is within t, and t flipped bits cannot touch t + 1 bands), so
it equals brute force. Fewer, wider bands are faster on large sets and may miss pairs near the threshold.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import NamedTuple

import numpy as np

HASH_BITS = 64
_HASH_SIDE = 32  # pHash works on a 32x32 DCT and keeps its low-frequency corner
AUDIO_RATE = 16_000
AUDIO_BANDS = (100.0, 7600.0)
AUDIO_MAP_DB = 20.0
THUMB_SIDE = 8
_FFT = 512
_HOP = 256


class Fingerprint(NamedTuple):
    """``words``: (L,) uint64 hashes, compared by Hamming distance; ``profile``: a small float vector (colour
    thumbnails, or an audio clip's texture signs), compared by mean absolute difference to confirm a Hamming
    match."""

    words: np.ndarray
    profile: np.ndarray


class FingerprintError(ValueError):
    """The media could not be decoded for fingerprinting (the record keeps its place; it just has no hash)."""


@lru_cache(maxsize=4)
def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``dct_matrix(n) @ x`` is the DCT of the column vector ``x``."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


@lru_cache(maxsize=1)
def _low_frequencies() -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the 64 lowest-frequency AC coefficients, ordered by u+v then u (a fixed zigzag)."""
    cells = sorted((u + v, u, v) for u in range(12) for v in range(12) if (u, v) != (0, 0))[:HASH_BITS]
    rows, cols = zip(*((u, v) for _, u, v in cells))
    return np.array(rows), np.array(cols)


def _pack_bits(bits: np.ndarray) -> np.uint64:
    """64 booleans -> one uint64, bit 63 first (so bands are contiguous bit ranges)."""
    return np.packbits(bits.astype(np.uint8)).view(">u8")[0].astype(np.uint64)


def dct_hash(grid: np.ndarray) -> np.uint64:
    """The 64-bit DCT hash of a 32x32 float array: low-frequency AC coefficients above their median."""
    d = dct_matrix(grid.shape[0])
    coeffs = d @ grid.astype(np.float64) @ d.T
    rows, cols = _low_frequencies()
    low = coeffs[rows, cols]
    return _pack_bits(low > np.median(low))


def _prepare(img):
    """RGB or L; alpha is dropped, not composited: re-encoders that drop it (to JPEG) keep the colour beneath."""
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def image_fingerprint_of(img) -> tuple[np.uint64, np.ndarray]:
    """(pHash, colour thumbnail) of a decoded PIL image."""
    from PIL import Image

    img = _prepare(img)
    gray = np.asarray(img.convert("L").resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.BOX), dtype=np.float32)
    thumb = img.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    return dct_hash(gray), np.asarray(thumb, dtype=np.float32).ravel()


def image_fingerprint(data: bytes) -> Fingerprint:
    """The fingerprint of encoded image bytes: one pHash word, an 8x8 RGB thumbnail profile."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        # decode JPEGs at a reduced scale: a 32x32 hash loses nothing and large photos decode much faster
        img.draft("RGB", (4 * _HASH_SIDE, 4 * _HASH_SIDE))
        img.load()
    except Exception as e:  # PIL raises many types for bad input
        raise FingerprintError(f"image: {type(e).__name__}: {e}") from e
    word, thumb = image_fingerprint_of(img)
    return Fingerprint(np.array([word], dtype=np.uint64), thumb)


def video_fingerprint(data: bytes, frames: int = 8, num_frames: int | None = None) -> Fingerprint:
    """pHash and thumbnail of ``frames`` frames sampled uniformly over the clip."""
    from curation.scoring.decode import DecodeError, sample_video_frames

    try:
        images = sample_video_frames(data, frames, num_frames=num_frames)
    except DecodeError as e:
        raise FingerprintError(str(e)) from e
    parts = [image_fingerprint_of(img) for img in images]
    return Fingerprint(np.array([w for w, _ in parts], dtype=np.uint64), np.concatenate([t for _, t in parts]))


@lru_cache(maxsize=2)
def _band_matrix(n_fft: int, rate: int, n_bands: int) -> np.ndarray:
    """(n_bands, n_fft//2+1) triangular filters on a log-frequency axis, each normalised to unit area."""
    lo, hi = np.log(AUDIO_BANDS[0]), np.log(AUDIO_BANDS[1])
    edges = np.exp(np.linspace(lo, hi, n_bands + 2))
    freqs = np.arange(n_fft // 2 + 1) * rate / n_fft
    bank = np.zeros((n_bands, freqs.size))
    for b in range(n_bands):
        left, centre, right = edges[b], edges[b + 1], edges[b + 2]
        bank[b] = np.clip(np.minimum((freqs - left) / (centre - left), (right - freqs) / (right - centre)), 0, None)
        if bank[b].sum() == 0:  # narrower than one FFT bin: take the nearest bin
            bank[b, int(np.argmin(np.abs(freqs - centre)))] = 1.0
        bank[b] /= bank[b].sum()
    return bank


def band_energy_grid(wave: np.ndarray, bands: int = 32, segments: int = 64, rate: int = AUDIO_RATE) -> np.ndarray:
    """Band energies (dB) of a mono clip on a ``bands`` x ``segments`` grid: log-spaced bands from 100 Hz to
    7.6 kHz, and equal time segments of the clip, so a clip and its resampled or re-encoded copy share a grid."""
    if wave.size < _FFT:
        wave = np.pad(wave, (0, _FFT - wave.size))
    n_frames = 1 + (wave.size - _FFT) // _HOP
    idx = np.arange(_FFT)[None, :] + _HOP * np.arange(n_frames)[:, None]
    power = np.abs(np.fft.rfft(wave[idx] * np.hanning(_FFT)[None, :], axis=1)) ** 2  # (frames, bins)
    energy = _band_matrix(_FFT, rate, bands) @ power.T  # (bands, frames)
    cols = np.minimum(((np.arange(n_frames) + 0.5) * segments / n_frames).astype(int), segments - 1)
    counts = np.bincount(cols, minlength=segments)
    sums = np.zeros((bands, segments))
    np.add.at(sums.T, cols, energy.T)
    grid = sums / np.maximum(counts, 1)[None, :]
    if (counts == 0).any():  # a clip shorter than `segments` frames: repeat the last filled segment
        grid = grid[:, np.maximum.accumulate(np.where(counts > 0, np.arange(segments), 0))]
    return 10.0 * np.log10(grid + 1e-12)


def audio_fingerprint(data: bytes) -> Fingerprint:
    """An energy-map hash word and a 2048-sign texture profile of encoded audio bytes (see the module notes)."""
    from curation.scoring.decode import DecodeError, decode_audio

    try:
        wave = decode_audio(data, AUDIO_RATE)
    except DecodeError as e:
        raise FingerprintError(str(e)) from e
    grid = band_energy_grid(wave)  # 32 x 64 dB
    power = 10.0 ** (grid / 10.0)
    coarse = 10.0 * np.log10(power.reshape(8, 4, 8, 8).mean(axis=(1, 3)) + 1e-12)
    word = _pack_bits((coarse >= coarse.max() - AUDIO_MAP_DB).ravel())
    padded = np.pad(grid, 1, mode="edge")
    local = sum(padded[i : i + grid.shape[0], j : j + grid.shape[1]] for i in range(3) for j in range(3)) / 9.0
    texture = np.sign(grid - local).astype(np.float32).ravel()
    return Fingerprint(np.array([word], dtype=np.uint64), texture)


def fingerprint(data: bytes, modality: str, video_frames: int = 8, num_frames: int | None = None) -> Fingerprint:
    """The perceptual fingerprint of one record's media; raises :class:`FingerprintError`."""
    if modality == "image":
        return image_fingerprint(data)
    if modality == "video":
        return video_fingerprint(data, video_frames, num_frames)
    if modality == "audio":
        return audio_fingerprint(data)
    raise ValueError(f"unknown modality {modality!r}")


# -- search -------------------------------------------------------------------------------------------------------


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean Hamming distance per word between rows of ``a`` and ``b`` (both (n, L) uint64)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).mean(axis=-1)


def _band_slices(bands: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) of ``bands`` contiguous bit ranges covering 64 bits, widths differing by at most one."""
    widths = [HASH_BITS // bands + (1 if i < HASH_BITS % bands else 0) for i in range(bands)]
    out, shift = [], HASH_BITS
    for w in widths:
        shift -= w
        out.append((shift, np.uint64((1 << w) - 1)))
    return out


def default_bands(max_distance: float) -> int:
    """The fewest bands that make banded search exact for ``max_distance`` (pigeonhole: t + 1)."""
    return min(HASH_BITS, int(np.floor(max_distance)) + 1)


def _candidate_pairs(keys: np.ndarray, split: int | None = None) -> np.ndarray:
    """(i, j), i < j, for every two rows sharing a key; with ``split``, only pairs of a row below ``split`` (a
    reference) and one at or above it (a query)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, keys.size])
    chunks = []
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = np.sort(order[start : start + size])
        if split is None:
            a, b = np.triu_indices(size, 1)
            chunks.append(np.stack([members[a], members[b]], axis=1))
        else:
            refs, queries = members[members < split], members[members >= split]
            if len(refs) and len(queries):
                a, b = np.meshgrid(refs, queries, indexing="ij")
                chunks.append(np.stack([a.ravel(), b.ravel()], axis=1))
    return np.concatenate(chunks) if chunks else np.empty((0, 2), dtype=np.int64)


def hamming_pairs(
    fps: np.ndarray, max_distance: float, bands: int | None = None, queries: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of fingerprints within ``max_distance`` (mean bits per word), found by banding.

    ``fps`` is (n, L) uint64. Without ``queries``: returns ((k, 2) index pairs i < j, (k,) distances) among
    ``fps``. With ``queries`` (m, L): pairs (query index, fps index) between the two sets. ``bands=None`` uses
    :func:`default_bands` (exact); fewer, wider bands are faster and may miss pairs near the threshold.
    """
    fps = np.ascontiguousarray(fps, dtype=np.uint64)
    bands = bands or default_bands(max_distance)
    n = fps.shape[0]
    both = fps if queries is None else np.concatenate([fps, np.ascontiguousarray(queries, dtype=np.uint64)])
    found = []
    for word in range(both.shape[1]):
        for shift, mask in _band_slices(bands):
            keys = (both[:, word] >> np.uint64(shift)) & mask
            pairs = _candidate_pairs(keys, None if queries is None else n)
            if queries is not None:  # as (query, reference)
                pairs = pairs[:, ::-1] - np.array([n, 0])
            found.append(pairs)
    if not found or not sum(len(p) for p in found):
        return np.empty((0, 2), dtype=np.int64), np.empty(0)
    pairs = np.unique(np.concatenate(found), axis=0)
    if queries is None:
        dist = hamming(fps[pairs[:, 0]], fps[pairs[:, 1]])
    else:
        dist = hamming(np.asarray(queries, dtype=np.uint64)[pairs[:, 0]], fps[pairs[:, 1]])
    keep = dist <= max_distance
    return pairs[keep], dist[keep]


def brute_force_pairs(fps: np.ndarray, max_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair within ``max_distance`` by comparing all pairs (for tests and tiny inputs)."""
    fps = np.asarray(fps, dtype=np.uint64)
    i, j = np.triu_indices(fps.shape[0], 1)
    dist = hamming(fps[i], fps[j])
    keep = dist <= max_distance
    return np.stack([i[keep], j[keep]], axis=1), dist[keep]


class Thresholds(NamedTuple):
    """When two fingerprints are near-duplicates: mean Hamming bits per word at most ``max_bits``, profiles' mean
    absolute difference at most ``max_profile``, durations within ``max_duration_s`` (``None``: not checked);
    ``bands``: see :func:`hamming_pairs`."""

    max_bits: float
    max_profile: float
    max_duration_s: float | None = None
    bands: int | None = None


def near_duplicates(
    words: np.ndarray,
    profiles: np.ndarray,
    durations: np.ndarray | None,
    th: Thresholds,
    queries: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Near-duplicate pairs: Hamming candidates (banded) confirmed by the profile and duration checks.

    ``words`` (n, L) uint64, ``profiles`` (n, P) float32, ``durations`` (n,) seconds or NaN (unknown: not
    checked). Without ``queries``: pairs i < j within the set. With ``queries`` = (words, profiles, durations) of
    another set: pairs (query index, index). Returns (pairs (k, 2), bits (k,), profile distance (k,)).
    """
    qw, qp, qd = (words, profiles, durations) if queries is None else queries
    pairs, bits = hamming_pairs(words, th.max_bits, th.bands, None if queries is None else qw)
    a, b = pairs[:, 0], pairs[:, 1]
    prof = np.abs(np.asarray(qp, dtype=np.float32)[a] - np.asarray(profiles, dtype=np.float32)[b]).mean(axis=1)
    ok = prof <= th.max_profile
    if th.max_duration_s is not None and durations is not None and qd is not None:
        gap = np.abs(np.asarray(qd, dtype=np.float64)[a] - np.asarray(durations, dtype=np.float64)[b])
        ok &= ~(gap > th.max_duration_s)  # NaN (unknown duration) passes
    return pairs[ok], bits[ok], prof[ok]
