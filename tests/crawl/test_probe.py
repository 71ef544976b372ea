"""Tests for curation.crawl.probe on media generated in the tests themselves."""

from __future__ import annotations

import io
import struct
import sys
import zlib

import numpy as np
import pytest

from curation.crawl import probe as probe_module
from curation.crawl import reasons
from curation.crawl.probe import probe_media

RNG = np.random.default_rng(1234)


# -- fixture builders ----------------------------------------------------------------------------------------------


def _image_bytes(fmt: str, mode: str = "RGB", size: tuple[int, int] = (96, 64), **save_kwargs) -> bytes:
    from PIL import Image

    pixels = (RNG.random((size[1], size[0], 3)) * 255).astype("uint8")
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def _animated_gif(frames: int = 4) -> bytes:
    from PIL import Image

    images = [Image.fromarray((RNG.random((40, 50, 3)) * 255).astype("uint8")).convert("P") for _ in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=100)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares a huge canvas over a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _video_codec() -> str:
    import av

    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _video_bytes(fmt: str = "mp4", codec: str | None = None, frames: int = 24, with_audio: bool = False) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec or _video_codec(), rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=48000) if with_audio else None
        for i in range(frames):
            img = np.full((48, 64, 3), 30, np.uint8)
            img[:, : (i * 64 // frames) + 1] = 220
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio is not None:
            _encode_tone(container, audio, seconds=frames / 12, rate=48000)
    return buf.getvalue()


def _encode_tone(container, stream, seconds: float, rate: int) -> None:
    import av

    tone = np.sin(np.arange(int(rate * seconds)) / 8.0).astype(np.float32)
    step = stream.codec_context.frame_size or 1024
    for start in range(0, len(tone), step):
        frame = av.AudioFrame.from_ndarray(tone[None, start : start + step].copy(), format="flt", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def _audio_only_container(fmt: str, codec: str, seconds: float = 1.0, rate: int = 44100) -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        _encode_tone(container, container.add_stream(codec, rate=rate), seconds, rate)
    return buf.getvalue()


def _soundfile_bytes(fmt: str, seconds: float = 1.0, rate: int = 16000, channels: int = 1) -> bytes:
    import soundfile

    tone = np.sin(np.arange(int(rate * seconds)) / 5.0).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, np.stack([tone] * channels, axis=1), rate, format=fmt)
    return buf.getvalue()


def _cut(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


@pytest.fixture(scope="module")
def media() -> dict[str, bytes]:
    return {
        "png": _image_bytes("PNG"),
        "png_rgba": _image_bytes("PNG", "RGBA"),
        "png_l": _image_bytes("PNG", "L"),
        "png_p": _image_bytes("PNG", "P"),
        "jpeg": _image_bytes("JPEG", quality=90),
        "jpeg_l": _image_bytes("JPEG", "L"),
        "webp": _image_bytes("WEBP"),
        "gif": _image_bytes("GIF", "P"),
        "agif": _animated_gif(),
        "bmp": _image_bytes("BMP"),
        "tiff": _image_bytes("TIFF"),
        "mp4": _video_bytes("mp4"),
        "mp4_av": _video_bytes("mp4", with_audio=True),
        "webm": _video_bytes("webm", "libvpx"),
        "mkv": _video_bytes("matroska"),
        "m4a": _audio_only_container("mp4", "aac", rate=48000),
        "mp3": _audio_only_container("mp3", "libmp3lame"),
        "wav": _soundfile_bytes("WAV", seconds=2.0),
        "flac": _soundfile_bytes("FLAC", seconds=2.0, rate=44100, channels=2),
    }


# -- images ----------------------------------------------------------------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize(
    "name,ext,mime",
    [
        ("png", "png", "image/png"),
        ("png_rgba", "png", "image/png"),
        ("png_l", "png", "image/png"),
        ("png_p", "png", "image/png"),
        ("jpeg", "jpg", "image/jpeg"),
        ("jpeg_l", "jpg", "image/jpeg"),
        ("webp", "webp", "image/webp"),
        ("gif", "gif", "image/gif"),
        ("bmp", "bmp", "image/bmp"),
    ],
)
def test_valid_images(media, name, ext, mime):
    result = probe_media(media[name], "image")
    assert result.ok, result
    assert (result.reason, result.detail) == (None, None)
    assert (result.modality, result.ext, result.mime) == ("image", ext, mime)
    assert (result.width, result.height) == (96, 64)


@pytest.mark.quick
def test_animated_gif(media):
    result = probe_media(media["agif"], "image")
    assert result.ok, result
    assert result.num_frames == 4
    assert probe_media(_cut(media["agif"]), "image").reason == reasons.TRUNCATED


@pytest.mark.quick
@pytest.mark.parametrize("name", ["png", "png_rgba", "jpeg", "webp", "gif", "bmp"])
def test_truncated_images(media, name):
    result = probe_media(_cut(media[name]), "image")
    assert not result.ok
    assert result.reason == reasons.TRUNCATED, result
    assert result.modality == "image"


@pytest.mark.quick
def test_png_without_iend_is_truncated(media):
    data = media["png"]
    assert data.endswith(b"IEND\xaeB`\x82")
    result = probe_media(data[:-12], "image")  # Pillow itself loads this happily
    assert result.reason == reasons.TRUNCATED
    assert "IEND" in result.detail


@pytest.mark.quick
def test_jpeg_without_eoi_is_truncated(media):
    data = media["jpeg"]
    assert data.endswith(b"\xff\xd9")
    assert probe_media(data[:-2], "image").reason == reasons.TRUNCATED


@pytest.mark.quick
def test_decompression_bomb_header_is_refused_before_decoding():
    result = probe_media(_png_header_only(100_000, 100_000), "image")
    assert result.reason == reasons.DECOMPRESSION_BOMB
    assert result.ext == "png"


@pytest.mark.quick
def test_pixel_limit_is_ours_not_pillows():
    from PIL import Image

    limit_before = Image.MAX_IMAGE_PIXELS
    data = _png_header_only(9000, 8000)  # 72 Mpx: under Pillow's own limit, over our default
    result = probe_media(data, "image")
    assert result.reason == reasons.DECOMPRESSION_BOMB
    assert (result.width, result.height) == (9000, 8000)
    assert "72000000" not in result.detail or "64000000" in result.detail
    small = probe_media(_image_bytes("PNG"), "image", max_pixels=1000)
    assert small.reason == reasons.DECOMPRESSION_BOMB
    assert Image.MAX_IMAGE_PIXELS == limit_before  # no global was touched


@pytest.mark.quick
def test_corrupt_image_with_magic_is_decode_error(media):
    data = bytearray(media["png"])
    data[60:400] = bytes(340)  # wreck the compressed stream, keep the structure
    result = probe_media(bytes(data), "image")
    assert result.reason == reasons.DECODE_ERROR, result
    assert result.ext == "png"


@pytest.mark.quick
@pytest.mark.parametrize(
    "data,hint",
    [
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        (bytes(range(256)) * 8, "unrecognised"),
        (b'{"error": "not found"}', "JSON"),
    ],
)
def test_not_an_image(data, hint):
    result = probe_media(data, "image")
    assert result.reason == reasons.NOT_AN_IMAGE
    assert hint in result.detail
    assert result.modality == "image"


@pytest.mark.quick
def test_unsupported_image_format(media):
    result = probe_media(media["tiff"], "image")
    assert result.reason == reasons.UNSUPPORTED_FORMAT
    assert result.ext == "tiff"


@pytest.mark.quick
def test_empty():
    for modality in ("image", "video", "audio"):
        result = probe_media(b"", modality)
        assert (result.ok, result.reason, result.modality) == (False, reasons.EMPTY, modality)


@pytest.mark.quick
def test_bad_expected_modality():
    with pytest.raises(ValueError):
        probe_media(b"x", "text")


# -- video -----------------------------------------------------------------------------------------------------------


@pytest.mark.quick
@pytest.mark.parametrize(
    "name,ext,mime",
    [
        ("mp4", "mp4", "video/mp4"),
        ("webm", "webm", "video/webm"),
        ("mkv", "mkv", "video/x-matroska"),
        ("mp4_av", "mp4", "video/mp4"),
    ],
)
def test_valid_videos(media, name, ext, mime):
    result = probe_media(media[name], "video")
    assert result.ok, result
    assert (result.modality, result.ext, result.mime) == ("video", ext, mime)
    assert (result.width, result.height) == (64, 48)
    assert result.fps == pytest.approx(12.0)
    assert result.num_frames == 24
    assert result.duration_s == pytest.approx(2.0, abs=0.1)


@pytest.mark.quick
@pytest.mark.parametrize("name", ["mp4", "mp4_av", "webm", "mkv"])
def test_truncated_videos(media, name):
    result = probe_media(_cut(media[name]), "video")
    assert result.reason == reasons.TRUNCATED, result
    assert result.modality == "video"


@pytest.mark.quick
def test_faststart_mp4_cut_in_mdat(media, tmp_path):
    import av

    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream(_video_codec(), rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(24):
            img = (RNG.random((48, 64, 3)) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert data[4:8] == b"ftyp" and b"moov" in data[:200]  # index first, so PyAV can open the cut file
    assert probe_media(data, "video").ok
    assert probe_media(_cut(data, 0.8), "video").reason == reasons.TRUNCATED


@pytest.mark.quick
def test_truncation_caught_without_size_fields(media):
    # A live-style Matroska stream declares no Segment size, so only the stream-coverage check can tell.
    data = media["mkv"]
    seg = data.index(bytes.fromhex("18538067"))
    assert data[seg + 4] == 0x01  # 8-byte size field
    unknown = data[: seg + 4] + b"\x01" + b"\xff" * 7 + data[seg + 12 :]
    assert probe_media(unknown, "video").ok
    result = probe_media(_cut(unknown), "video")
    assert result.reason == reasons.TRUNCATED
    assert "declared 2.00 s" in result.detail


@pytest.mark.quick
def test_long_video_path_decodes_head_and_tail(media, monkeypatch):
    monkeypatch.setattr(probe_module, "_FULL_DECODE_PIXELS", 0)
    result = probe_media(media["mp4"], "video")
    assert result.ok, result
    assert result.num_frames == 24
    assert probe_media(_cut(media["webm"]), "video").reason == reasons.TRUNCATED


@pytest.mark.quick
def test_video_limits(media):
    assert probe_media(media["mp4"], "video", max_duration_s=1.0).reason == reasons.DECOMPRESSION_BOMB
    assert probe_media(media["mp4"], "video", max_pixels=1000).reason == reasons.DECOMPRESSION_BOMB


@pytest.mark.quick
def test_garbage_video():
    result = probe_media(bytes(range(256)) * 40, "video")
    assert result.reason == reasons.NOT_A_VIDEO
    assert result.modality == "video"


@pytest.mark.quick
def test_corrupt_container_with_magic_is_decode_error():
    data = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 10  # EBML magic, then noise
    assert probe_media(data, "video").reason == reasons.DECODE_ERROR


@pytest.mark.quick
def test_audio_where_video_expected(media):
    result = probe_media(media["mp3"], "video")
    assert result.reason == reasons.NOT_A_VIDEO
    assert result.modality == "audio"
    assert "mp3" in result.detail and "no video stream" in result.detail


@pytest.mark.quick
def test_image_where_video_expected(media):
    result = probe_media(media["png"], "video")
    assert result.reason == reasons.NOT_A_VIDEO
    assert result.detail == "bytes are an image (png)"
    assert (result.modality, result.width) == ("image", 96)


# -- audio -----------------------------------------------------------------------------------------------------------


@pytest.mark.quick
def test_wav(media):
    result = probe_media(media["wav"], "audio")
    assert result.ok, result
    assert (result.ext, result.mime, result.sample_rate, result.channels) == ("wav", "audio/wav", 16000, 1)
    assert result.duration_s == pytest.approx(2.0)


@pytest.mark.quick
def test_flac(media):
    result = probe_media(media["flac"], "audio")
    assert result.ok, result
    assert (result.ext, result.mime, result.sample_rate, result.channels) == ("flac", "audio/flac", 44100, 2)
    assert result.duration_s == pytest.approx(2.0)


@pytest.mark.quick
@pytest.mark.parametrize("name", ["wav", "flac", "mp3"])
def test_truncated_audio(media, name):
    result = probe_media(_cut(media[name]), "audio")
    assert result.reason == reasons.TRUNCATED, result
    assert result.modality == "audio"


@pytest.mark.quick
def test_audio_without_soundfile(media, monkeypatch):
    monkeypatch.setitem(sys.modules, "soundfile", None)  # makes `import soundfile` raise ImportError
    for name in ("wav", "flac"):
        result = probe_media(media[name], "audio")
        assert result.ok, result
        assert result.duration_s == pytest.approx(2.0, abs=0.05)
        assert probe_media(_cut(media[name]), "audio").reason == reasons.TRUNCATED


@pytest.mark.quick
def test_mp3_and_m4a(media):
    mp3 = probe_media(media["mp3"], "audio")
    assert mp3.ok, mp3
    assert (mp3.ext, mp3.mime, mp3.sample_rate) == ("mp3", "audio/mpeg", 44100)
    m4a = probe_media(media["m4a"], "audio")
    assert m4a.ok, m4a
    assert (m4a.modality, m4a.ext, m4a.mime) == ("audio", "mp4", "audio/mp4")
    assert probe_media(media["m4a"], "video").reason == reasons.NOT_A_VIDEO


@pytest.mark.quick
def test_long_audio_path(media, monkeypatch):
    monkeypatch.setattr(probe_module, "_FULL_DECODE_AUDIO_S", 0.0)
    assert probe_media(media["mp3"], "audio").ok
    assert probe_media(_cut(media["mp3"]), "audio").reason == reasons.TRUNCATED


@pytest.mark.quick
def test_audio_limits(media):
    assert probe_media(media["wav"], "audio", max_duration_s=1.0).reason == reasons.DECOMPRESSION_BOMB
    assert probe_media(media["mp3"], "audio", max_duration_s=0.5).reason == reasons.DECOMPRESSION_BOMB


@pytest.mark.quick
def test_garbage_audio():
    assert probe_media(b"RIFF\x00\x00\x00\x00WAVEjunk" * 3, "audio").reason == reasons.TRUNCATED
    assert probe_media(b"hello world, definitely not audio" * 20, "audio").reason == reasons.NOT_AN_AUDIO


@pytest.mark.quick
def test_wrong_modality_details(media):
    image_as_audio = probe_media(media["jpeg"], "audio")
    assert image_as_audio.reason == reasons.NOT_AN_AUDIO
    assert image_as_audio.detail == "bytes are an image (jpg)"
    video_as_audio = probe_media(media["mp4_av"], "audio")
    assert video_as_audio.reason == reasons.NOT_AN_AUDIO
    assert video_as_audio.detail == "bytes are a video (mp4)"
    assert video_as_audio.modality == "video"
    audio_as_image = probe_media(media["flac"], "image")
    assert audio_as_image.reason == reasons.NOT_AN_IMAGE
    assert audio_as_image.detail == "bytes are audio (flac)"
    video_as_image = probe_media(media["webm"], "image")
    assert (video_as_image.reason, video_as_image.modality) == (reasons.NOT_AN_IMAGE, "video")
    broken_video_as_image = probe_media(_cut(media["mp4"]), "image")
    assert broken_video_as_image.reason == reasons.NOT_AN_IMAGE
    assert broken_video_as_image.detail.startswith("bytes look like a video (mp4) but:")


@pytest.mark.quick
def test_to_dict(media):
    result = probe_media(media["mp4"], "video")
    meta = result.to_dict()
    assert set(meta) == {
        "modality",
        "ext",
        "mime",
        "width",
        "height",
        "duration_s",
        "fps",
        "num_frames",
        "sample_rate",
        "channels",
    }
    assert meta["width"] == 64 and meta["sample_rate"] is None


@pytest.mark.quick
def test_small_image_probe_is_fast(media):
    import time

    data = _image_bytes("JPEG", size=(256, 256))
    probe_media(data, "image")
    start = time.perf_counter()
    for _ in range(50):
        assert probe_media(data, "image").ok
    assert (time.perf_counter() - start) / 50 < 0.01
