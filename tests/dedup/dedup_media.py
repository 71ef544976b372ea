"""Media factories for the dedup tests: the embedded sample's own renderers (mottled backgrounds, jittered shapes,
tones and noise with a faint noise floor), so distinct items are as alike as the sample's, and copies are made the
way the sample makes its near-duplicates."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from curation.sample import generate as sample

IMAGE = {"shape": "star", "color": "red", "position": "center", "size": "large", "bg": "white", "width": 240,
         "height": 180, "mode": "RGB", "format": "png"}  # fmt: skip
VIDEO = {"shape": "circle", "color": "blue", "motion": "left_to_right", "bg": "gray", "width": 96, "height": 96,
         "frames": 12, "fps": 8, "codec": "libx264", "format": "mp4"}  # fmt: skip
TONE = {"kind": "tone", "pitch": "mid", "pattern": "beeps3", "sample_rate": 16000, "channels": 1, "format": "wav"}
NOISE = {"kind": "noise", "pitch": None, "pattern": "steady", "sample_rate": 16000, "channels": 1, "format": "wav"}


def image(seed: int, **attrs) -> bytes:
    a = {**IMAGE, **attrs}
    rng = np.random.default_rng(seed)
    return sample.encode_image(sample.render_image(a, rng), a["format"], rng)


def image_variants(data: bytes, seed: int = 0) -> dict[str, bytes]:
    """Resized, recompressed and cropped copies (the sample's near-duplicate operations)."""
    rng = np.random.default_rng(seed)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    dx, dy = round(w * 0.02), round(h * 0.02)
    return {
        "resize": sample.encode_image(
            img.resize((round(w * 0.6), round(h * 0.6)), Image.Resampling.BILINEAR), "png", rng
        ),
        "recompress": sample.encode_image(img, "jpg", rng, quality=40),
        "crop": sample.encode_image(img.crop((dx, dy, w - dx, h - dy)), "png", rng),
    }


def audio(seed: int, attrs: dict = TONE, rate: int | None = None, fmt: str = "wav") -> tuple[bytes, np.ndarray, int]:
    a = {**attrs, "sample_rate": rate or attrs["sample_rate"]}
    samples = sample.render_audio(a, np.random.default_rng(seed))
    return sample.encode_audio(samples, a["sample_rate"], fmt), samples, a["sample_rate"]


def audio_variants(samples: np.ndarray, rate: int, fmt: str = "wav") -> dict[str, bytes]:
    """Resampled (up and down), gain-changed and transcoded copies."""
    other = "flac" if fmt == "wav" else "wav"
    out = {
        "gain": sample.encode_audio(samples * 0.6, rate, fmt),
        "transcode": sample.encode_audio(samples, rate, other),
    }
    for to in (16000, 22050, 44100):
        if to != rate:
            out[f"resample_{to}"] = sample.encode_audio(sample._resample(samples, rate, to), to, fmt)
    return out


def video(seed: int, **attrs) -> bytes:
    a = {**VIDEO, **attrs}
    frames = sample.render_video_frames(a, np.random.default_rng(seed))
    return sample.encode_video(frames, a["fps"], a["codec"], a["format"])


def video_variants(data: bytes) -> dict[str, bytes]:
    frames = sample.decode_video_frames(data)
    small = [np.asarray(Image.fromarray(f).resize((64, 64), Image.Resampling.BILINEAR)) for f in frames]
    return {
        "rescale": sample.encode_video(small, VIDEO["fps"], VIDEO["codec"], VIDEO["format"]),
        "bitrate": sample.encode_video(frames, VIDEO["fps"], VIDEO["codec"], VIDEO["format"], quality="low"),
    }
