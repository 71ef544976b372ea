"""Identify and validate downloaded media bytes: what they are, whether they decode, and basic metadata.

Runs on every crawled file, so the common case (a small, valid image) stays cheap: no copies of the
bytes, Pillow limited to the formats we keep, and container checks that read a few header bytes.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

from curation.crawl import reasons
from curation.schemas import MEDIA_METADATA

IMAGE = "image"
VIDEO = "video"
AUDIO = "audio"
MODALITIES = (IMAGE, VIDEO, AUDIO)

# Pillow format -> canonical extension. MPO (multi-picture JPEG from cameras) opens through the JPEG plugin.
_PIL_EXTS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
# Restricting Image.open to these skips plugins without magic bytes (TGA) that "identify" random data.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_AV_EXTS = frozenset({"mp4", "webm", "mkv", "mov", "wav", "flac", "mp3", "ogg"})
_MIMES = {
    (IMAGE, "jpg"): "image/jpeg",
    (IMAGE, "png"): "image/png",
    (IMAGE, "webp"): "image/webp",
    (IMAGE, "gif"): "image/gif",
    (IMAGE, "bmp"): "image/bmp",
    (VIDEO, "mp4"): "video/mp4",
    (VIDEO, "webm"): "video/webm",
    (VIDEO, "mkv"): "video/x-matroska",
    (VIDEO, "mov"): "video/quicktime",
    (VIDEO, "ogg"): "video/ogg",
    (AUDIO, "wav"): "audio/wav",
    (AUDIO, "flac"): "audio/flac",
    (AUDIO, "mp3"): "audio/mpeg",
    (AUDIO, "ogg"): "audio/ogg",
    (AUDIO, "mp4"): "audio/mp4",
    (AUDIO, "webm"): "audio/webm",
    (AUDIO, "mkv"): "audio/x-matroska",
    (AUDIO, "mov"): "audio/quicktime",
}
_NOT_A = {IMAGE: reasons.NOT_AN_IMAGE, VIDEO: reasons.NOT_A_VIDEO, AUDIO: reasons.NOT_AN_AUDIO}
_PNG_IEND = b"IEND\xaeB`\x82"
# ISO-BMFF brands that mark still images (HEIF/AVIF), not video.
_IMAGE_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"mif1", b"msf1", b"hevc", b"hevx"})
# Decode every frame when the clip is at most this big; otherwise the first frames and the last GOP.
_FULL_DECODE_PIXELS = 200_000_000
_FULL_DECODE_AUDIO_S = 300.0
_HEAD_FRAMES = 3
_MAX_TAIL_PACKETS = 300

_META_FIELDS = ("modality", "ext", "mime", *MEDIA_METADATA)


@dataclass
class ProbeResult:
    """What :func:`probe_media` found; ``reason`` is a code from :mod:`curation.crawl.reasons` when not ok."""

    ok: bool
    reason: str | None
    detail: str | None
    modality: str
    ext: str | None
    mime: str | None
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    num_frames: int | None = None
    sample_rate: int | None = None
    channels: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metadata fields as a flat dict (no ok/reason/detail)."""
        return {name: getattr(self, name) for name in _META_FIELDS}


def probe_media(
    data: bytes, expected_modality: str, max_pixels: int = 64_000_000, max_duration_s: float = 3600.0
) -> ProbeResult:
    """Check that ``data`` is a complete, decodable file of ``expected_modality`` and describe it."""
    if expected_modality not in MODALITIES:
        raise ValueError(f"expected_modality must be one of {MODALITIES}, not {expected_modality!r}")
    if not data:
        return _fail(reasons.EMPTY, "no bytes", expected_modality)
    kind, sniffed = _sniff(data)
    if expected_modality == IMAGE:
        if kind in (None, IMAGE):
            return _probe_image(data, max_pixels, sniffed)
        actual = _probe_av(data, None, kind, sniffed, max_pixels, max_duration_s)
        return _wrong_modality(actual, IMAGE, kind, sniffed)
    if kind == IMAGE:
        return _wrong_modality(_probe_image(data, max_pixels, sniffed), expected_modality, kind, sniffed)
    if expected_modality == AUDIO and sniffed in ("wav", "flac"):
        result = _probe_soundfile(data, sniffed, max_duration_s)
        if result is not None:
            return result
    return _probe_av(data, expected_modality, kind, sniffed, max_pixels, max_duration_s)


# -- helpers ------------------------------------------------------------------------------------------------------


def _fail(reason: str, detail: str, modality: str, ext: str | None = None, **meta: Any) -> ProbeResult:
    mime = _MIMES.get((modality, ext)) if ext else None
    return ProbeResult(False, reason, detail, modality, ext, mime, **meta)


def _wrong_modality(actual: ProbeResult, expected: str, kind: str | None, sniffed: str | None) -> ProbeResult:
    """Reject bytes that are (or look like) another modality, naming what they are."""
    if actual.ok or actual.reason in (reasons.DECOMPRESSION_BOMB, reasons.UNSUPPORTED_FORMAT):
        detail = f"bytes are {_describe_medium(actual.modality, actual.ext)}"
        if expected == VIDEO and actual.modality == AUDIO:
            detail += ", no video stream"
    else:
        what = _describe_medium(kind or actual.modality, sniffed or actual.ext)
        detail = f"bytes look like {what} but: {actual.detail}"
    return dataclasses.replace(actual, ok=False, reason=_NOT_A[expected], detail=detail)


def _describe_medium(modality: str, ext: str | None) -> str:
    article = {IMAGE: "an image", VIDEO: "a video", AUDIO: "audio"}[modality]
    return f"{article} ({ext})" if ext else article


def _describe_unknown(data: bytes) -> str:
    head = data[:512].lstrip()
    if head[:1] == b"<":
        lowered = head[:64].lower()
        if lowered.startswith((b"<!doctype html", b"<html")) or b"<html" in lowered:
            return "bytes look like an HTML page"
        return "bytes look like XML/markup text"
    if head[:1] in (b"{", b"["):
        return "bytes look like JSON text"
    return f"unrecognised bytes (starting {data[:8].hex()})"


def _sniff(data: bytes) -> tuple[str | None, str | None]:
    """(modality, extension) from magic bytes; extensions outside the canonical set mark unsupported formats."""
    head = data[:16]
    if head.startswith(b"\xff\xd8\xff"):
        return IMAGE, "jpg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return IMAGE, "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return IMAGE, "gif"
    if head.startswith(b"RIFF") and len(head) >= 12:
        return {b"WEBP": (IMAGE, "webp"), b"WAVE": (AUDIO, "wav"), b"AVI ": (VIDEO, "avi")}.get(
            head[8:12], (None, None)
        )
    if (
        head.startswith(b"BM")
        and len(data) >= 26
        and int.from_bytes(data[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    ):
        return IMAGE, "bmp"  # "BM" alone is too weak; the DIB header size must be a known one
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return IMAGE, "tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _IMAGE_BRANDS:
            return IMAGE, "avif" if brand in (b"avif", b"avis") else "heif"
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return AUDIO, "mp4"
        return VIDEO, "mov" if brand == b"qt  " else "mp4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return VIDEO, "mov"  # QuickTime files predating ftyp
    if head.startswith(b"\x00\x00\x01\x00") and len(data) > 22:
        return IMAGE, "ico"
    if head.startswith(b"8BPS"):
        return IMAGE, "psd"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return VIDEO, "webm" if b"webm" in data[:64] else "mkv"
    if head.startswith(b"OggS"):
        return (VIDEO if b"\x80theora" in data[:512] else AUDIO), "ogg"
    if head.startswith(b"fLaC"):
        return AUDIO, "flac"
    if head.startswith(b"ID3"):
        return AUDIO, "mp3"
    if len(head) >= 3 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 would be ADTS AAC. Two bytes are weak evidence, so also
        # require a usable bitrate and sample-rate index in the third.
        if head[1] & 0x06 == 0:
            return AUDIO, "aac"
        if head[2] >> 4 not in (0, 15) and (head[2] >> 2) & 3 != 3:
            return AUDIO, "mp3"
    if head.startswith(b"FLV\x01"):
        return VIDEO, "flv"
    if head[:1] == b"\x47" and len(data) > 376 and data[188] == 0x47 and data[376] == 0x47:
        return VIDEO, "ts"
    return None, None


# -- structural truncation checks: cheap, header-only ---------------------------------------------------------------


def _truncation(data: bytes, ext: str | None) -> str | None:
    """A detail string when the container's own size fields say bytes are missing, else None."""
    if ext in ("mp4", "mov"):
        return _bmff_truncation(data)
    if ext in ("webm", "mkv"):
        return _ebml_truncation(data)
    if ext == "wav":
        return _wav_truncation(data)
    if ext in ("webp", "avi"):
        declared = int.from_bytes(data[4:8], "little")
        if declared not in (0, 0xFFFFFFFF) and 8 + declared > len(data):
            return f"RIFF declares {8 + declared} bytes, got {len(data)}"
    if ext == "png" and not data.endswith(_PNG_IEND) and data.rfind(_PNG_IEND) < 0:
        return "PNG has no IEND chunk"
    return None


def _bmff_truncation(data: bytes) -> str | None:
    """Walk MP4/QuickTime top-level boxes; a box running past the end, or no moov at all, means truncation."""
    pos, n = 0, len(data)
    seen_moov = False
    while pos + 8 <= n:
        size = int.from_bytes(data[pos : pos + 4], "big")
        box = data[pos + 4 : pos + 8]
        if size == 1:
            if pos + 16 > n:
                return f"{box.decode('latin-1')} box header cut at byte {n}"
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:  # the last box, extending to the end of the file
            return None
        if size < 8:
            return None  # not a box structure we understand: let the decoder judge
        seen_moov = seen_moov or box == b"moov"
        if pos + size > n:
            return f"{box.decode('latin-1')} box needs {pos + size} bytes, got {n}"
        pos += size
    if not seen_moov and pos > 0:
        return "no moov box (index missing)"
    return None


def _ebml_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int, bool] | None:
    """(value, length, all_ones) of an EBML variable-length integer at ``pos``.

    None when no vint can start there (corrupt data); value -1 when the bytes end inside it.
    """
    if pos >= len(data):
        return -1, 0, False
    first = data[pos]
    if first == 0:
        return None
    length = 9 - first.bit_length()
    if pos + length > len(data):
        return -1, length, False
    value = first if keep_marker else first & (0xFF >> length)
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    all_ones = not keep_marker and value == (1 << (7 * length)) - 1
    return value, length, all_ones


def _ebml_truncation(data: bytes) -> str | None:
    """Matroska/WebM: the Segment element's declared size (when known) must fit in the bytes we have."""
    pos = 0
    for expected_id in (0x1A45DFA3, 0x18538067):  # EBML header, then Segment
        ident = _ebml_vint(data, pos, keep_marker=True)
        if ident is None or (ident[0] >= 0 and ident[0] != expected_id):
            return None  # not the structure we expect: let the decoder judge
        size = _ebml_vint(data, pos + ident[1], keep_marker=False) if ident[0] >= 0 else (-1, 0, False)
        if size is None:
            return None
        if size[0] < 0:
            return f"bytes end inside the EBML element at byte {pos}"
        start = pos + ident[1] + size[1]
        if expected_id == 0x18538067:
            if not size[2] and start + size[0] > len(data):
                return f"Segment needs {start + size[0]} bytes, got {len(data)}"
            return None
        pos = start + size[0]
    return None


def _wav_truncation(data: bytes) -> str | None:
    pos, n = 12, len(data)
    while pos + 8 <= n:
        chunk = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > n:
                return f"data chunk declares {size} bytes, {n - pos - 8} present"
            return None
        pos += 8 + size + (size & 1)
    return "no data chunk"


# -- images ---------------------------------------------------------------------------------------------------------


def _image_failure(exc: BaseException, data: bytes, sniffed: str | None) -> tuple[str, str]:
    """Classify a Pillow error as truncated or decode_error."""
    message = f"{type(exc).__name__}: {exc}"
    structural = _truncation(data, sniffed)
    if structural is not None or isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return reasons.TRUNCATED, structural or message
    return reasons.DECODE_ERROR, message


def _probe_image(data: bytes, max_pixels: int, sniffed: str | None) -> ProbeResult:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own hard limit, hit while reading the header
        return _fail(reasons.DECOMPRESSION_BOMB, str(exc), IMAGE, sniffed if sniffed in _PIL_EXTS.values() else None)
    except UnidentifiedImageError:
        if sniffed is None:
            return _fail(reasons.NOT_AN_IMAGE, _describe_unknown(data), IMAGE)
        if sniffed not in _PIL_EXTS.values():
            return _fail(reasons.UNSUPPORTED_FORMAT, f"{sniffed} images are not supported", IMAGE, sniffed)
        structural = _truncation(data, sniffed)
        if structural is not None:
            return _fail(reasons.TRUNCATED, structural, IMAGE, sniffed)
        return _fail(reasons.DECODE_ERROR, f"{sniffed} header is not readable", IMAGE, sniffed)
    except Exception as exc:  # noqa: BLE001 - plugins raise anything from SyntaxError to struct.error
        if sniffed is None:
            return _fail(reasons.NOT_AN_IMAGE, _describe_unknown(data), IMAGE)
        reason, detail = _image_failure(exc, data, sniffed)
        return _fail(reason, detail, IMAGE, sniffed)
    with img:
        width, height = img.size
        meta = {"width": width, "height": height}
        ext = _PIL_EXTS.get(img.format or "")
        if ext is None:
            return _fail(reasons.UNSUPPORTED_FORMAT, f"{img.format} images are not supported", IMAGE, **meta)
        # The header is parsed but nothing is decoded yet: refuse before allocating width * height pixels.
        if width * height > max_pixels:
            return _fail(
                reasons.DECOMPRESSION_BOMB, f"{width}x{height} exceeds {max_pixels} pixels", IMAGE, ext, **meta
            )
        n_frames = 1
        try:
            img.load()
            if getattr(img, "is_animated", False):
                n_frames = _load_frames(img, max_pixels)
        except Exception as exc:  # noqa: BLE001
            reason, detail = _image_failure(exc, data, ext)
            return _fail(reason, detail, IMAGE, ext, **meta)
    structural = _truncation(data, ext)
    if structural is not None:
        return _fail(reasons.TRUNCATED, structural, IMAGE, ext, **meta)
    return ProbeResult(True, None, None, IMAGE, ext, _MIMES[(IMAGE, ext)], num_frames=n_frames, **meta)


def _load_frames(img: Any, max_pixels: int) -> int:
    """Decode the frames of an animation (so a cut-off later frame is caught) within a pixel budget."""
    n_frames = img.n_frames
    budget = max_pixels - img.size[0] * img.size[1]
    for index in range(1, n_frames):
        budget -= img.size[0] * img.size[1]
        if budget < 0:
            break
        img.seek(index)
        img.load()
    return n_frames


# -- audio via soundfile ----------------------------------------------------------------------------------------------


def _probe_soundfile(data: bytes, ext: str, max_duration_s: float) -> ProbeResult | None:
    """WAV/FLAC through libsndfile; None means "ask PyAV" (no soundfile, an odd codec, or a read error to diagnose)."""
    try:
        import soundfile
    except ImportError:  # soundfile is optional; PyAV handles these formats too
        return None
    if ext == "wav":
        structural = _wav_truncation(data)
        if structural is not None:
            return _fail(reasons.TRUNCATED, structural, AUDIO, ext)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as snd:
            sample_rate, channels, declared = snd.samplerate, snd.channels, snd.frames
            meta = {
                "sample_rate": sample_rate,
                "channels": channels,
                "duration_s": declared / sample_rate if sample_rate else None,
                "num_frames": declared,
            }
            if meta["duration_s"] is not None and meta["duration_s"] > max_duration_s:
                return _fail(
                    reasons.DECOMPRESSION_BOMB,
                    f"duration {meta['duration_s']:.1f} s exceeds {max_duration_s:g} s",
                    AUDIO,
                    ext,
                    **meta,
                )
            got = 0
            block = 1 << 16
            while True:
                # int16 into a raw buffer: cheapest way to make libsndfile decode every frame.
                chunk = snd.buffer_read(block, dtype="int16")
                count = len(chunk) // (2 * channels)
                if count == 0:
                    break
                got += count
    except Exception:  # noqa: BLE001 - libsndfile errors are diagnosed by the PyAV path
        return None
    if got < declared:
        return _fail(reasons.TRUNCATED, f"read {got} of {declared} sample frames", AUDIO, ext, **meta)
    return ProbeResult(True, None, None, AUDIO, ext, _MIMES[(AUDIO, ext)], **meta)


# -- audio and video via PyAV ---------------------------------------------------------------------------------------


def _container_ext(format_name: str, data: bytes) -> str | None:
    names = set(format_name.split(","))
    if "mov" in names or "mp4" in names:
        if data[4:8] == b"ftyp":
            return "mov" if data[8:12] == b"qt  " else "mp4"
        return "mov"
    if "matroska" in names or "webm" in names:
        return "webm" if b"webm" in data[:64] else "mkv"
    for name in ("ogg", "mp3", "wav", "flac"):
        if name in names:
            return name
    return None


def _declares_duration(ext: str | None, data: bytes) -> bool:
    """Whether the container states its duration (so a shorter stream means lost bytes), vs. an estimate."""
    if ext in ("mp4", "mov", "webm", "mkv", "flac", "ogg"):
        return True
    if ext == "mp3":
        start = 0
        if data.startswith(b"ID3") and len(data) >= 10:
            # Syncsafe ID3v2 size: 7 bits per byte.
            start = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
        frame = data[start : start + 200]
        return b"Xing" in frame or b"Info" in frame or b"VBRI" in frame
    return False


def _probe_av(
    data: bytes,
    expected: str | None,
    kind: str | None,
    sniffed: str | None,
    max_pixels: int,
    max_duration_s: float,
) -> ProbeResult:
    """Open with PyAV. ``expected=None`` only identifies the medium (for a wrong-modality message)."""
    import av

    fallback = expected or kind or VIDEO
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:  # noqa: BLE001 - FFmpegError subclasses, plus ValueError for odd inputs
        if kind is None:
            return _fail(_NOT_A[fallback], _describe_unknown(data), fallback)
        structural = _truncation(data, sniffed)
        if structural is not None or isinstance(exc, EOFError):
            return _fail(reasons.TRUNCATED, structural or f"{type(exc).__name__}: {exc}", kind, sniffed)
        return _fail(reasons.DECODE_ERROR, f"cannot open {sniffed}: {type(exc).__name__}: {exc}", kind, sniffed)
    with container:
        video = next((s for s in container.streams.video if not _is_cover_art(s)), None)
        audio = next(iter(container.streams.audio), None)
        if video is None and audio is None:
            structural = _truncation(data, sniffed)
            if structural is not None:  # e.g. an MP4 cut before its moov box opens with no streams
                return _fail(reasons.TRUNCATED, structural, kind or fallback, sniffed)
            return _fail(_NOT_A[fallback], f"{container.format.name} container has no audio or video stream", fallback)
        actual = VIDEO if video is not None else AUDIO
        target = video if video is not None else audio
        ext = _container_ext(container.format.name, data)
        meta = _av_metadata(container, target, actual)
        if ext is None:
            # Keep the container's own name so the ledger says what it was.
            shown = sniffed or container.format.name.split(",")[0]
            found = ProbeResult(True, None, None, actual, shown, None, **meta)
            if expected is None:
                return found
            if actual != expected:
                return _wrong_modality(found, expected, kind, sniffed)
            detail = f"{shown} {actual} is not a supported container"
            return _fail(reasons.UNSUPPORTED_FORMAT, detail, actual, shown, **meta)
        found = ProbeResult(True, None, None, actual, ext, _MIMES.get((actual, ext)), **meta)
        if expected is None:
            return found
        if actual != expected:
            return _wrong_modality(found, expected, kind, sniffed)
        if meta["duration_s"] is not None and meta["duration_s"] > max_duration_s:
            detail = f"duration {meta['duration_s']:.1f} s exceeds {max_duration_s:g} s"
            return _fail(reasons.DECOMPRESSION_BOMB, detail, actual, ext, **meta)
        if actual == VIDEO and (meta["width"] or 0) * (meta["height"] or 0) > max_pixels:
            detail = f"{meta['width']}x{meta['height']} frames exceed {max_pixels} pixels"
            return _fail(reasons.DECOMPRESSION_BOMB, detail, actual, ext, **meta)
        structural = _truncation(data, ext)
        if structural is not None:
            return _fail(reasons.TRUNCATED, structural, actual, ext, **meta)
        return _validate_av(container, target, actual, ext, data, meta)


def _is_cover_art(stream: Any) -> bool:
    import av

    return bool(stream.disposition & av.stream.Disposition.attached_pic)


def _av_metadata(container: Any, target: Any, modality: str) -> dict[str, Any]:
    duration = None
    if container.duration is not None and container.duration > 0:
        duration = container.duration / 1_000_000  # AV_TIME_BASE
    elif target.duration is not None and target.time_base is not None:
        duration = float(target.duration * target.time_base)
    meta: dict[str, Any] = {"duration_s": duration}
    ctx = target.codec_context
    if modality == VIDEO:
        rate = target.average_rate or target.guessed_rate or target.base_rate
        fps = float(rate) if rate else None
        frames = target.frames or (round(duration * fps) if duration and fps else None)
        meta.update(width=ctx.width or None, height=ctx.height or None, fps=fps, num_frames=frames or None)
    else:
        meta.update(sample_rate=ctx.sample_rate or None, channels=ctx.channels or None)
    return meta


def _validate_av(
    container: Any, target: Any, modality: str, ext: str, data: bytes, meta: dict[str, Any]
) -> ProbeResult:
    """Demux every packet (to see how much of the declared duration exists) and decode what the budget allows."""
    import av

    duration = meta["duration_s"]
    if modality == VIDEO:
        frames_est = meta["num_frames"] or 0
        decode_all = (
            duration is None or frames_est * (meta["width"] or 0) * (meta["height"] or 0) <= _FULL_DECODE_PIXELS
        )
    else:
        decode_all = duration is None or duration <= _FULL_DECODE_AUDIO_S
    target.codec_context.thread_count = 1  # the pipeline already runs one probe per core
    decoded = 0
    errors = 0
    errors_at_end = 0  # failures on a packet that runs to the last byte: the file was cut inside it
    first_error: BaseException | None = None
    end_s: float | None = None
    tail: list[Any] | None = []
    frame_s = 1 / meta["fps"] if modality == VIDEO and meta.get("fps") else 0.0
    try:
        for packet in container.demux():
            if packet.size and packet.time_base is not None:
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None:
                    span = packet.duration * packet.time_base if packet.duration else frame_s
                    end = float(ts * packet.time_base + span)
                    end_s = end if end_s is None or end > end_s else end_s
            if packet.stream is not target:
                continue
            if decode_all or decoded < _HEAD_FRAMES:
                try:
                    decoded += len(packet.decode())
                except av.error.FFmpegError as exc:
                    errors += 1
                    first_error = first_error or exc
                    if packet.pos is not None and packet.pos >= 0 and packet.pos + packet.size >= len(data):
                        errors_at_end += 1
            elif packet.size and tail is not None:
                if packet.is_keyframe:
                    tail = [packet]
                elif len(tail) < _MAX_TAIL_PACKETS:
                    tail.append(packet)
                else:
                    tail = None  # GOP too long to keep: rely on the demux coverage check
    except av.error.FFmpegError as exc:
        errors += 1
        first_error = first_error or exc
    if not decode_all and tail:
        # Long media: also decode the last GOP, from a keyframe, with a fresh decoder.
        try:
            target.codec_context.flush_buffers()
            for packet in tail:
                decoded += len(packet.decode())
            decoded += len(target.codec_context.decode(None))
        except av.error.FFmpegError as exc:
            errors += 1
            first_error = first_error or exc
    if decode_all and modality == VIDEO and decoded:
        meta["num_frames"] = decoded
    start_s = container.start_time / 1_000_000 if container.start_time is not None else 0.0
    covered = (end_s - start_s) if end_s is not None else 0.0
    if duration and _declares_duration(ext, data):
        tolerance = max(0.3, 0.01 * duration) + frame_s
        if covered < duration - tolerance:
            detail = f"streams end at {covered:.2f} s of a declared {duration:.2f} s"
            return _fail(reasons.TRUNCATED, detail, modality, ext, **meta)
    if errors and errors == errors_at_end:
        detail = f"the last packet is cut short ({type(first_error).__name__}: {first_error})"
        return _fail(reasons.TRUNCATED, detail, modality, ext, **meta)
    if errors:
        detail = f"{errors} decode error(s), first: {type(first_error).__name__}: {first_error}"
        return _fail(reasons.DECODE_ERROR, detail, modality, ext, **meta)
    if decoded == 0:
        return _fail(reasons.DECODE_ERROR, f"no {modality} frames decoded", modality, ext, **meta)
    return ProbeResult(True, None, None, modality, ext, _MIMES.get((modality, ext)), **meta)
