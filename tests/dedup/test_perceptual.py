"""Perceptual fingerprints survive re-encoding, tell distinct items apart, and banded search equals brute force."""

from __future__ import annotations

import numpy as np
import pytest
from dedup_media import NOISE, TONE, audio, audio_variants, image, image_variants, video, video_variants

from curation.dedup.perceptual import (
    FingerprintError,
    Thresholds,
    brute_force_pairs,
    dct_matrix,
    fingerprint,
    hamming,
    hamming_pairs,
    near_duplicates,
)

pytestmark = pytest.mark.quick

# the stage's defaults (curation.config.DedupConfig)
IMAGE_TH = Thresholds(max_bits=12, max_profile=5.0)
VIDEO_TH = Thresholds(max_bits=10, max_profile=6.0, max_duration_s=0.05)
AUDIO_TH = Thresholds(max_bits=4, max_profile=0.7, max_duration_s=0.05)


def distance(a: bytes, b: bytes, modality: str) -> tuple[float, float]:
    fa, fb = fingerprint(a, modality), fingerprint(b, modality)
    return float(hamming(fa.words, fb.words)), float(np.abs(fa.profile - fb.profile).mean())


def test_dct_matrix_is_orthonormal():
    d = dct_matrix(32)
    assert np.allclose(d @ d.T, np.eye(32), atol=1e-10)


@pytest.mark.parametrize("attrs", [{}, {"shape": "circle", "position": "top left", "size": "small"},
                                   {"mode": "RGBA", "bg": "gray", "color": "green"}, {"mode": "L", "color": "black"}])  # fmt: skip
def test_image_phash_survives_resize_recompress_and_crop(attrs):
    original = image(1, **attrs)
    for op, copy in image_variants(original).items():
        bits, colour = distance(original, copy, "image")
        assert bits <= IMAGE_TH.max_bits and colour <= IMAGE_TH.max_profile, (op, bits, colour)


def test_images_of_the_same_description_are_told_apart():
    # same shape, place and size: pHash alone is close for these; the colour thumbnail keeps them apart
    items = [image(seed, color=color) for seed in range(4) for color in ("red", "green", "blue")]
    fps = [fingerprint(x, "image") for x in items]
    pairs, _, _ = near_duplicates(np.stack([f.words for f in fps]), np.stack([f.profile for f in fps]), None, IMAGE_TH)
    assert len(pairs) == 0


@pytest.mark.parametrize("attrs,rate", [(TONE, 16000), (TONE, 22050), (NOISE, 16000), (NOISE, 44100),
                                        ({**TONE, "pattern": "rising", "pitch": "high"}, 44100)])  # fmt: skip
def test_audio_fingerprint_survives_resample_gain_and_transcode(attrs, rate):
    data, samples, sr = audio(3, attrs, rate)
    for op, copy in audio_variants(samples, sr).items():
        bits, texture = distance(data, copy, "audio")
        assert bits <= AUDIO_TH.max_bits and texture <= AUDIO_TH.max_profile, (op, bits, texture)


def test_distinct_recordings_of_the_same_sound_are_told_apart():
    # equal attributes (and for steady noise, no structure at all): only the recording's own texture differs
    for attrs in (TONE, {**TONE, "pattern": "steady"}, NOISE):
        clips = [audio(seed, attrs)[0] for seed in range(5)]
        for i in range(len(clips)):
            for j in range(i + 1, len(clips)):
                _, texture = distance(clips[i], clips[j], "audio")
                assert texture > AUDIO_TH.max_profile, (attrs["pattern"], i, j, texture)


def test_video_fingerprint_survives_rescale_and_bitrate_and_tells_clips_apart():
    original = video(5)
    for op, copy in video_variants(original).items():
        bits, colour = distance(original, copy, "video")
        assert bits <= VIDEO_TH.max_bits and colour <= VIDEO_TH.max_profile, (op, bits, colour)
    other = video(6)  # same description, another rendering
    bits, colour = distance(original, other, "video")
    assert bits > VIDEO_TH.max_bits or colour > VIDEO_TH.max_profile
    assert len(fingerprint(original, "video", video_frames=5).words) == 5


def test_undecodable_media_raise_fingerprint_error():
    for modality in ("image", "video", "audio"):
        with pytest.raises(FingerprintError):
            fingerprint(b"\x00\x01 not media at all" * 10, modality)


def _planted(n: int, words: int, max_flips: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    fps = rng.integers(0, 2**63, size=(n, words), dtype=np.uint64) * np.uint64(2)
    for i in range(0, n - 1, 3):  # near copies with 0..max_flips flipped bits per word
        fps[i + 1] = fps[i]
        for w in range(words):
            for bit in rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False):
                fps[i + 1, w] ^= np.uint64(1) << np.uint64(int(bit))
    return fps


@pytest.mark.parametrize("max_bits,words", [(0, 1), (3, 1), (8, 1), (12, 1), (6, 4)])
def test_banding_equals_brute_force(max_bits, words):
    fps = _planted(300, words, max_bits + 3, seed=max_bits)
    got, got_d = hamming_pairs(fps, max_bits)
    want, want_d = brute_force_pairs(fps, max_bits)
    assert {tuple(p) for p in got.tolist()} == {tuple(p) for p in want.tolist()}
    assert len(want) > 10  # the planted copies within the threshold are there to be found
    assert sorted(got_d.tolist()) == sorted(want_d.tolist())


def test_banded_queries_equal_brute_force_across_two_sets():
    fps = _planted(200, 1, 10, seed=7)
    reference, queries = fps[::2], fps[1::2]
    got, _ = hamming_pairs(reference, 8, queries=queries)
    dist = np.bitwise_count(queries[:, None, 0] ^ reference[None, :, 0])
    want = {(int(q), int(r)) for q, r in zip(*np.nonzero(dist <= 8))}
    assert {tuple(p) for p in got.tolist()} == want and want


def test_fewer_bands_only_lose_pairs():
    fps = _planted(300, 1, 12, seed=3)
    exact = {tuple(p) for p in hamming_pairs(fps, 10)[0].tolist()}
    coarse = {tuple(p) for p in hamming_pairs(fps, 10, bands=4)[0].tolist()}
    assert coarse <= exact and len(coarse) < len(exact)


def test_duration_check_separates_equal_hashes():
    words = np.zeros((2, 1), dtype=np.uint64)
    profiles = np.zeros((2, 4), dtype=np.float32)
    th = Thresholds(max_bits=0, max_profile=0.0, max_duration_s=0.05)
    assert len(near_duplicates(words, profiles, np.array([1.0, 1.02]), th)[0]) == 1
    assert len(near_duplicates(words, profiles, np.array([1.0, 1.2]), th)[0]) == 0
    assert len(near_duplicates(words, profiles, np.array([1.0, np.nan]), th)[0]) == 1  # unknown: not checked
