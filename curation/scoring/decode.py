"""Media decoding shared by the scorers and the bootstrap trainer, so a model is trained on exactly the inputs it
scores: images through open_clip's own preprocessing, video as N frames sampled uniformly with PyAV, audio as
mono float32 at the model's sample rate (PyAV's resampler, or the same samples by a plain format conversion where
that is all the resampler would do)."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np


class DecodeError(ValueError):
    """The media bytes cannot be decoded (a reject reason, not a bug)."""


def image_transform(preprocess_cfg: dict[str, Any]):
    """open_clip's whole inference transform (PIL image -> normalised tensor) for a preprocess config."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    keys = PreprocessCfg.__dataclass_fields__
    return image_transform_v2(PreprocessCfg(**{k: v for k, v in preprocess_cfg.items() if k in keys}), is_train=False)


class ImagePreprocessor:
    """open_clip's inference preprocessing for one model, split in two: the geometric part (resize, crop or pad)
    runs in decode tasks and yields small uint8 arrays; :meth:`to_tensor` (scale and normalise) runs next to the
    model. Together they equal open_clip's own transform (a test compares them pixel for pixel, in every resize
    mode).

    The geometry is open_clip's, step for step, in plain PIL and numpy: building open_clip's transform imports
    open_clip, torch and torchvision, which took 5.7 s of CPU in every new decode worker process, more than
    decoding a thousand images."""

    def __init__(self, preprocess_cfg: dict[str, Any]):
        size = preprocess_cfg.get("size", 224)
        self.hw: tuple[int, int] = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.size = max(self.hw)
        self.mode = preprocess_cfg.get("resize_mode") or "shortest"
        if self.mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode: {self.mode!r} is not shortest, longest or squash")
        self.bilinear = preprocess_cfg.get("interpolation") == "bilinear"  # open_clip: anything else is bicubic
        self.fill = int(preprocess_cfg.get("fill_color") or 0)
        self.mean = tuple(float(m) for m in preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(float(s) for s in preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)))

    def geometry(self, h: int, w: int) -> tuple[tuple[int, int], bool, int]:
        """For an image of ``h`` x ``w``: its resized size (h, w), whether that resize is bilinear (else bicubic),
        and the fill of any pad around it."""
        th, tw = self.hw
        if self.mode == "squash":  # torchvision Resize((h, w))
            return (th, tw), self.bilinear, 0
        if self.mode == "longest":  # open_clip ResizeKeepRatio(longest=1) + CenterCropOrPad(fill_color)
            return _keep_ratio((h, w), self.hw, longest=True), self.bilinear, self.fill
        if th == tw:  # torchvision Resize(size): the shorter edge to size, the longer in proportion, truncated
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = th, int(th * long / short)
            return ((new_long, new_short) if w <= h else (new_short, new_long)), self.bilinear, 0
        # open_clip ResizeKeepRatio(size) at its default bicubic, whatever the interpolation
        return _keep_ratio((h, w), self.hw, longest=False), False, 0

    def pixels(self, img) -> np.ndarray:
        """RGB PIL image -> uint8 array (H, W, 3) at the model's input size."""
        from PIL import Image

        w, h = img.size
        new, bilinear, fill = self.geometry(h, w)
        if new != (h, w):  # torchvision leaves an image already at the size untouched
            img = img.resize((new[1], new[0]), Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC)
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
        return arr if self.mode == "squash" else _center_crop_or_pad(arr, self.hw, fill)

    def resized(self, arrays: list[np.ndarray], device: Any = "cpu"):
        """Images (H, W, 3) and videos (F, H, W, 3) as decoded, at any size, resized and cropped as :meth:`pixels`
        does it, bit for bit, on ``device``: a uint8 tensor (frames, H, W, 3) (see
        :mod:`curation.scoring.resample`)."""
        from curation.scoring.resample import resize_batch

        return resize_batch(arrays, self.geometry, self.hw, device)

    @staticmethod
    def to_tensor(pixels, mean, std, device="cpu", dtype=None):
        """uint8 (N, H, W, 3) -> normalised float tensor (N, 3, H, W), computed on ``device``. ``pixels`` may be a
        tensor, or a list of such arrays (as :func:`frame_runs` gives them), copied to ``device`` by
        :func:`device_bytes`."""
        import torch

        if isinstance(pixels, torch.Tensor):
            x = pixels.to(device)
        else:
            parts = list(pixels) if isinstance(pixels, (list, tuple)) else [pixels]
            x = device_bytes(parts, device).view(-1, *parts[0].shape[1:])
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        m = to_device(mean, device, torch.float32).view(1, -1, 1, 1)
        s = to_device(std, device, torch.float32).view(1, -1, 1, 1)
        x = (x - m) / s
        return x.to(dtype) if dtype is not None else x


def _keep_ratio(hw: tuple[int, int], target: tuple[int, int], longest: bool) -> tuple[int, int]:
    """open_clip's ``ResizeKeepRatio`` size at inference: scale by the longest (or shortest) edge's ratio. An edge
    that would round to nothing (a strip 500 times longer than wide, fitted into the square) keeps one pixel,
    where open_clip's own transform raises."""
    rh, rw = hw[0] / target[0], hw[1] / target[1]
    ratio = max(rh, rw) if longest else min(rh, rw)
    return max(1, round(hw[0] / ratio)), max(1, round(hw[1] / ratio))


def crop_offset(size: int, target: int) -> int:
    """Where the centre crop (or pad) of an axis of ``size`` pixels to ``target`` starts: torchvision's crop offset
    rounds half to even; a pad (negative) puts the odd pixel after."""
    return -((target - size) // 2) if target > size else int(round((size - target) / 2.0))


def _center_crop_or_pad(arr: np.ndarray, hw: tuple[int, int], fill: int) -> np.ndarray:
    """torchvision's ``center_crop`` (``fill`` 0) and open_clip's ``center_crop_or_pad``: pad an edge shorter than
    the target, then take the centre (:func:`crop_offset`)."""
    (th, tw), (h, w) = hw, arr.shape[:2]
    top, left = crop_offset(h, th), crop_offset(w, tw)
    if th > h or tw > w:
        pads = [(max(-o, 0), max(t - n + o, 0)) for o, t, n in ((top, th, h), (left, tw, w))]
        arr = np.pad(arr, (*pads, (0, 0)), constant_values=fill)
        top, left = max(top, 0), max(left, 0)
    return np.ascontiguousarray(arr[top : top + th, left : left + tw])


def open_image(data: bytes, target_size: int | None = None):
    """Decode image bytes to an RGB PIL image. ``target_size`` lets JPEG decode at a reduced scale (DCT scaling),
    which is much faster for large photos and loses nothing the model would see."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if target_size:
            img.draft("RGB", (target_size * 2, target_size * 2))
        img.load()
    except Exception as e:  # PIL raises many types for bad input
        raise DecodeError(f"image: {type(e).__name__}: {e}") from e
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


class _RgbFrames:
    """Decoded video frames as RGB PIL images, all through one swscale context. PyAV's ``frame.to_image()`` gives
    every frame a context of its own, and setting one up cost more than decoding the frame (0.8 ms against 0.09 ms
    a frame for the sample's small clips); the pixels are the same."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self.reformatter = VideoReformatter()  # keeps its context while the frames' size and format stay the same

    def __call__(self, frame):
        from PIL import Image

        return Image.fromarray(self.reformatter.reformat(frame, format="rgb24").to_ndarray())


def _uniform_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread evenly over ``total`` frames (centres of ``n`` equal segments)."""
    if total <= 0:
        return []
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def sample_video_frames(data: bytes, n: int, num_frames: int | None = None, max_seconds: float = 600.0) -> list:
    """``n`` RGB PIL frames sampled uniformly over the clip (always ``n``: short clips repeat frames).

    ``num_frames`` (from the crawl probe) avoids a counting pass. Clips longer than ``max_seconds`` are sampled by
    seeking instead of decoding every frame."""
    import av

    rgb = _RgbFrames()
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise DecodeError("video: no video stream")
            # one thread: decoding runs in many tasks (and DataLoader workers) at once, which is where its
            # parallelism comes from. PyAV's default starts a slice thread a core for every clip, and that start-up
            # made decoding the sample's short clips 35-50% slower (and frame threads 20%).
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            if duration is not None and duration > max_seconds:
                return _seek_frames(container, stream, duration, n, rgb)
            total = num_frames or stream.frames or 0
            if total <= 0:  # unknown frame count: decode once, hold the decoded frames, convert the sampled ones
                frames = list(container.decode(stream))
                if not frames:
                    raise DecodeError("video: no frames decoded")
                wanted = _uniform_indices(len(frames), n)
                converted = {i: rgb(frames[i]) for i in set(wanted)}
                return [converted[i] for i in wanted]
            wanted = _uniform_indices(total, n)
            picked: dict[int, Any] = {}
            last = None
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    picked[i] = rgb(frame)
                last = (i, frame)
                if i >= wanted[-1]:
                    break
            if last is None:
                raise DecodeError("video: no frames decoded")
            if len(picked) < len(set(wanted)):  # fewer frames than the container said: resample what we have
                return sample_video_frames(data, n, num_frames=last[0] + 1, max_seconds=max_seconds)
            return [picked[i] for i in wanted]
    except DecodeError:
        raise
    except Exception as e:  # PyAV raises its own error types for broken streams
        raise DecodeError(f"video: {type(e).__name__}: {e}") from e


def _seek_frames(container, stream, duration: float, n: int, rgb: _RgbFrames) -> list:
    frames = []
    for i in range(n):
        t = duration * (i + 0.5) / n
        container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
        frame = None
        for frame in container.decode(stream):
            if frame.time is not None and frame.time >= t:
                break
        if frame is None:
            raise DecodeError(f"video: no frame at {t:.1f} s")
        frames.append(rgb(frame))
    return frames


# sample formats whose mono frames at the target rate become float32 samples without FFmpeg's resampler, and the
# power of two that scales integers to [-1, 1): the resampler's own samples, bit for bit (a test compares every
# sample clip and generated clips in each format; 24-bit FLAC decodes as s32). Others (double, unsigned 8-bit)
# keep the resampler.
_AS_FLOAT = {"s16": 2.0**-15, "s16p": 2.0**-15, "s32": 2.0**-31, "s32p": 2.0**-31, "flt": None, "fltp": None}


def _as_float(frame, sample_rate: int) -> np.ndarray | None:
    """A mono frame already at ``sample_rate`` as float32 samples, or ``None`` where it needs the resampler.
    Setting up the resampler's filter graph took half the decode time of a short 16 kHz clip (1.13 against
    0.56 ms), though for such frames it only converts the sample format."""
    if frame.sample_rate != sample_rate or len(frame.layout.channels) != 1 or frame.format.name not in _AS_FLOAT:
        return None
    scale = _AS_FLOAT[frame.format.name]
    samples = frame.to_ndarray().reshape(-1)
    return samples.astype(np.float32) * np.float32(scale) if scale is not None else samples.astype(np.float32)


def decode_audio(data: bytes, sample_rate: int, max_seconds: float | None = None) -> np.ndarray:
    """Mono float32 samples at ``sample_rate``; longer clips keep their first ``max_seconds`` (deterministic,
    unlike a random crop)."""
    import av

    limit = int(max_seconds * sample_rate) if max_seconds else None
    chunks: list[np.ndarray] = []
    got = 0
    resampler = None  # made for the first frame that needs more than a format conversion
    try:
        with _open_audio(data) as container:
            for frame in container.decode(audio=0):
                direct = _as_float(frame, sample_rate) if resampler is None else None
                if direct is not None:
                    chunks.append(direct)
                    got += direct.shape[0]
                else:
                    resampler = resampler or av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
                    for out in resampler.resample(frame):
                        chunk = out.to_ndarray().reshape(-1)
                        chunks.append(chunk)
                        got += chunk.shape[0]
                if limit is not None and got >= limit:
                    break
            else:
                for out in resampler.resample(None) if resampler is not None else []:
                    chunks.append(out.to_ndarray().reshape(-1))
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"audio: {type(e).__name__}: {e}") from e
    if not chunks:
        raise DecodeError("audio: no samples decoded")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    return wave[:limit] if limit is not None else wave


def _open_audio(data: bytes):
    """A PyAV container with an audio stream. It probes 4 KiB first: FFmpeg's default probe reads up to 5 MB, and
    for PCM in WAV that alone took two thirds of the decode time of a short clip. Streams it cannot place from that
    much (an MP3 behind a large ID3 tag, say) are opened again with the default probe."""
    import av

    try:
        container = av.open(io.BytesIO(data), options={"probesize": "4096"})
        if container.streams.audio:
            return container
        container.close()
    except av.error.FFmpegError:
        pass
    container = av.open(io.BytesIO(data))
    if not container.streams.audio:
        container.close()
        raise DecodeError("audio: no audio stream")
    return container


# -- the decode step of the score pipeline (Ray Data tasks, apart from the model actors) -------------------------


@dataclass
class DecodePlan:
    """What the decode tasks turn media into: the geometric preprocessing of the image-text model for images and
    video frames (``None``: that modality is not scored), the number of frames, and the CLAP inputs
    (:class:`AudioFeatures`; ``None``: audio is not scored), made here or, with ``audio_waves``, by the actor.
    With ``pixels_as_decoded`` images and frames go at their decoded size (JPEGs at a reduced scale where that
    is enough) and the CLIP actor resizes them on its GPU, to the same pixels (:mod:`curation.scoring.resample`);
    images over :data:`AS_DECODED_MAX_AREA` times the model's input area are still resized here."""

    image: dict[str, Any] | None = None
    video: dict[str, Any] | None = None
    video_frames: int = 8
    audio: AudioFeatures | None = None
    audio_waves: bool = False  # send the clips' samples: the CLAP actor makes their log-mels on its GPU
    pixels_as_decoded: bool = False  # send images and frames unresized: the CLIP actor resizes them on its GPU


# with ``pixels_as_decoded``, an image (after JPEG's reduced-scale decode) up to this many times the model's input
# area goes unresized: larger ones would cost the object store and the GPU more than their resize costs a core
AS_DECODED_MAX_AREA = 16


INPUT_COLUMNS = ("inputs", "input_shape")


@lru_cache(maxsize=4)
def _image_preprocessor(cfg_json: str) -> ImagePreprocessor:
    return ImagePreprocessor(json.loads(cfg_json))


@dataclass
class AudioFeatures:
    """A CLAP feature extractor's computation as plain numbers and its mel filter bank, taken from the extractor on
    the driver, so decode tasks compute CLAP inputs with numpy alone: importing transformers to build the extractor
    took 2.7 s of CPU in every new decode worker process.

    Each clip is cut to the extractor's maximum length first, so its random crop never runs and a score never
    changes from one run to the next. With the cut, both of the extractor's modes reduce to one log-mel of the
    padded clip: ``rand_trunc`` (unfused models) takes it with Slaney filters as one channel, ``fusion`` with HTK
    filters repeated over its four channels."""

    sampling_rate: int
    max_samples: int
    padding: str
    n_fft: int
    hop: int
    filters: np.ndarray
    channels: int

    @classmethod
    def of(cls, fe) -> AudioFeatures:
        """The computation of a transformers ``ClapFeatureExtractor`` (its truncation and padding modes are
        checked: a new mode must not be computed the old way without notice)."""
        if fe.truncation not in ("fusion", "rand_trunc") or fe.padding not in ("pad", "repeatpad", "repeat"):
            raise ValueError(f"CLAP feature extractor: truncation {fe.truncation!r} with padding {fe.padding!r} is "
                             "not supported (known: fusion or rand_trunc; pad, repeatpad or repeat)")  # fmt: skip
        fusion = fe.truncation == "fusion"
        return cls(sampling_rate=fe.sampling_rate, max_samples=fe.nb_max_samples, padding=fe.padding,
                   n_fft=fe.fft_window_size, hop=fe.hop_length, channels=4 if fusion else 1,
                   filters=fe.mel_filters if fusion else fe.mel_filters_slaney)  # fmt: skip

    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        """CLAP inputs (N, C, T, F) for mono waveforms at ``sampling_rate``."""
        return np.stack([np.repeat(self.mel(w), self.channels, axis=0) for w in waves])

    def mel(self, wave: np.ndarray) -> np.ndarray:
        """One clip's log-mel as float32 (1, T, F): what a decode task sends, a quarter of the 4-channel input of a
        fused model, whose channels are all the same for a clip cut to the maximum length
        (:meth:`model_inputs` repeats them next to the model)."""
        wave = np.asarray(wave, dtype=np.float32)[: self.max_samples]
        return self.log_mel(_pad(wave, self.max_samples, self.padding)).astype(np.float32)[None]

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """(T, n_mels) log-mel power spectrogram in dB: centred frames (reflect padding), periodic Hann window,
        the mel filters and a 1e-10 floor, as ``ClapFeatureExtractor`` computes it frame by frame, vectorised
        (about ten times faster)."""
        x = np.pad(wave.astype(np.float64), (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[:: self.hop]
        window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(self.n_fft) / self.n_fft)
        power = np.abs(np.fft.rfft(frames * window, n=self.n_fft)) ** 2
        return 10.0 * np.log10(np.maximum(power @ self.filters, 1e-10))

    def log_mel_on(self, waves: list[np.ndarray], device: Any = "cpu"):
        """:meth:`log_mel` of every clip, padded as :func:`_pad` pads it, as one float64 torch computation on
        ``device`` (N, T, F). On a GPU this is nearly free, while on the CPU it was most of a clip's decode time:
        for the extractor's defaults (48 kHz, 10 s, 1,024-point frames) 6 to 13 ms a clip, against 1.4 to 2.5 ms
        to decode and resample it."""
        import torch

        waves = [np.asarray(w, dtype=np.float32)[: self.max_samples] for w in waves]
        lengths = to_device([len(w) for w in waves], device)[:, None]
        starts = torch.cumsum(lengths, 0) - lengths
        flat = to_device(np.concatenate([*waves, np.zeros(1, np.float32)]), device).double()
        # the extractor's padding as one gather: sample i of a clip of n samples is its sample i % n where kept,
        # else the zero after the last clip
        pos = torch.arange(self.max_samples, device=device)[None]
        n = lengths.clamp_min(1)
        if self.padding == "repeat":
            keep = lengths > 0
        elif self.padding == "repeatpad":
            keep = pos < (self.max_samples // n) * n
        else:
            keep = pos < lengths
        x = flat[torch.where(keep, starts + pos % n, flat.numel() - 1)]
        x = torch.nn.functional.pad(x[:, None], (self.n_fft // 2, self.n_fft // 2), mode="reflect")[:, 0]
        frames = x.unfold(-1, self.n_fft, self.hop)
        k = torch.arange(self.n_fft, device=device, dtype=torch.float64)
        spec = torch.fft.rfft(frames * (0.5 - 0.5 * torch.cos(2 * np.pi * k / self.n_fft)), n=self.n_fft)
        mel = (spec.real**2 + spec.imag**2) @ to_device(self.filters, device, torch.float64)
        return 10.0 * torch.log10(mel.clamp_min(1e-10))

    def model_inputs(self, arrays: list[np.ndarray], device: Any = "cpu", dtype: Any = None):
        """The model's ``input_features`` (N, C, T, F), a torch tensor on ``device``, from what the decode step
        made for each clip: its log-mel (1, T, F), or its samples (1-D), whose log-mels are made here."""
        import torch

        waves = [i for i, a in enumerate(arrays) if a.ndim == 1]
        mels = [i for i, a in enumerate(arrays) if a.ndim != 1]
        parts = []  # (positions, float32 log-mels): float32 first, as the decode tasks' log-mels
        if waves:
            parts.append((waves, self.log_mel_on([arrays[i] for i in waves], device).float()))
        if mels:
            parts.append((mels, to_device(np.stack([arrays[i][0] for i in mels]), device)))
        if len(parts) == 1:  # one kind a batch (the stage sends samples with a GPU, log-mels without)
            x = parts[0][1]
        else:
            out: list[Any] = [None] * len(arrays)
            for rows, values in parts:
                for i, m in zip(rows, values):
                    out[i] = m
            x = torch.stack(out)
        x = x.to(dtype or torch.float32)
        return x[:, None].expand(-1, self.channels, -1, -1).contiguous()


def audio_features(feature_extractor, waves: list[np.ndarray]) -> np.ndarray:
    """CLAP inputs (N, C, T, F) for mono waveforms at a ``ClapFeatureExtractor``'s rate (see
    :class:`AudioFeatures`)."""
    return AudioFeatures.of(feature_extractor)(waves)


def _pad(wave: np.ndarray, length: int, how: str) -> np.ndarray:
    """The extractor's padding of a short clip: ``repeat`` (tiled, cut), ``repeatpad`` (whole repeats, then
    zeros) or ``pad`` (zeros)."""
    if len(wave) == 0 or len(wave) >= length:
        return np.pad(wave, (0, length - len(wave)))
    if how == "repeat":
        wave = np.tile(wave, length // len(wave) + 1)[:length]
    elif how == "repeatpad":
        wave = np.tile(wave, length // len(wave))
    return np.pad(wave, (0, length - len(wave)))


def decode_one(data: bytes, modality: str, plan: DecodePlan, num_frames: int | None = None) -> np.ndarray | None:
    """Model-ready array for one record: uint8 (H, W, 3) for an image, (F, H, W, 3) for a video (at the model's
    input size, or with ``plan.pixels_as_decoded`` as decoded), float32 (1, T, F) log-mel for audio (its samples,
    1-D, with ``plan.audio_waves``); ``None`` when that modality is not scored.
    Raises :class:`DecodeError`."""
    if modality == "image" and plan.image is not None:
        pre = _image_preprocessor(json.dumps(plan.image, sort_keys=True))
        img = open_image(data, pre.size)
        return np.asarray(img) if _as_decoded(plan, pre, img) else pre.pixels(img)
    if modality == "video" and plan.video is not None:
        pre = _image_preprocessor(json.dumps(plan.video, sort_keys=True))
        frames = sample_video_frames(data, plan.video_frames, num_frames)
        # a stream that changes size midway has its frames resized here, to one size
        as_decoded = _as_decoded(plan, pre, frames[0]) and all(f.size == frames[0].size for f in frames)
        return np.stack([np.asarray(f) if as_decoded else pre.pixels(f) for f in frames])
    if modality == "audio" and plan.audio is not None:
        audio = plan.audio
        wave = decode_audio(data, audio.sampling_rate, audio.max_samples / audio.sampling_rate)
        return wave if plan.audio_waves else audio.mel(wave)
    return None


def _as_decoded(plan: DecodePlan, pre: ImagePreprocessor, img) -> bool:
    """Whether an RGB image (or a clip's frames, all of its size) goes to the actor at its decoded size."""
    return plan.pixels_as_decoded and img.size[0] * img.size[1] <= AS_DECODED_MAX_AREA * pre.hw[0] * pre.hw[1]


_MALLOC_SET: bool | None = None  # whether keep_freed_memory took effect in this process (None: not tried)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Let this process reuse the memory it frees instead of handing it back to the kernel after every clip (glibc
    only; elsewhere a no-op). glibc serves blocks over its adaptive threshold (128 KiB at first) by mmap and trims
    the heap's free top whenever it passes twice that, so each clip's few-hundred-KiB buffers (the log-mel's
    frames and spectrum, the stacked video frames) arrived as fresh pages the kernel had to map and zero again:
    that took a third of an audio clip's decode time (4.2-5.2 ms against 2.9-3.1 ms a clip with the tiny CLAP's
    log-mels). Once set, the process keeps up to ``trim_threshold`` bytes of freed heap for its next blocks.
    Returns whether the setting took effect."""
    global _MALLOC_SET
    if _MALLOC_SET is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
            _MALLOC_SET = bool(libc.mallopt(m_mmap_threshold, mmap_threshold))
            _MALLOC_SET = bool(libc.mallopt(m_trim_threshold, trim_threshold)) and _MALLOC_SET
        except (OSError, AttributeError):  # not glibc
            _MALLOC_SET = False
    return _MALLOC_SET


def decode_batch(batch, plan: DecodePlan):
    """Ray Data batch function: read each record's media from its crawl shard (by tar offset) and decode it.

    Adds ``inputs`` (the array's bytes), ``input_shape`` and ``undecodable`` (the reason media that the crawl
    accepted still fails to decode; such records are rejected, never dropped)."""
    import pyarrow as pa

    keep_freed_memory()
    rows = batch.to_pydict()
    n = batch.num_rows
    inputs: list[np.ndarray | None] = [None] * n
    shapes: list[list[int] | None] = [None] * n
    errors: list[str | None] = [None] * n
    handles: dict[str, Any] = {}
    try:
        for i in range(n):
            tar = rows["tar"][i]
            f = handles.get(tar) or handles.setdefault(tar, open(tar, "rb"))
            f.seek(rows["offset"][i])
            data = f.read(rows["size"][i])
            try:
                arr = decode_one(data, rows["modality"][i], plan, rows["num_frames"][i])
            except DecodeError as e:
                errors[i] = str(e)[:500]
                continue
            if arr is not None:
                inputs[i] = arr
                shapes[i] = list(arr.shape)
    finally:
        for f in handles.values():
            f.close()
    keep = [c for c in batch.column_names if c not in ("tar", "offset", "size")]
    out = batch.select(keep)
    out = out.append_column("inputs", binary_column(inputs))
    out = out.append_column("input_shape", pa.array(shapes, pa.list_(pa.int32())))
    return out.append_column("undecodable", pa.array(errors, pa.string()))


def binary_column(arrays: list[np.ndarray | None]):
    """Arrays' bytes as a ``large_binary`` Arrow array (``None`` as null), copied once into one buffer: through
    ``bytes`` objects each array was copied twice, 66 against 34 us for a 300 x 400 image sent as decoded, 2.0
    against 1.2 ms for eight 480p frames."""
    import pyarrow as pa

    flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays if a is not None]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    np.cumsum([0 if a is None else a.nbytes for a in arrays], out=offsets[1:])
    data = np.concatenate(flat) if flat else np.empty(0, np.uint8)
    nulls = len(arrays) - len(flat)
    valid = pa.array([a is not None for a in arrays]).buffers()[1] if nulls else None
    buffers = [valid, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(arrays), buffers, null_count=nulls)


def input_array(data, shape: list[int], modality: str) -> np.ndarray:
    """The array :func:`decode_batch` stored for one row (``data``: bytes or a zero-copy ``pyarrow.Buffer``)."""
    dtype = np.float32 if modality == "audio" else np.uint8
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def media_rows(batch, modalities: tuple[str, ...]) -> tuple[list[int], dict[str, list]]:
    """Positions of the rows a media scorer handles (its modalities, decoded) and the plain columns it needs; the
    ``inputs`` bytes stay in Arrow memory (read them with :func:`row_inputs`)."""
    cols = {c: batch.column(c).to_pylist() for c in ("modality", "caption", "input_shape", "undecodable")}
    todo = [
        i for i, m in enumerate(cols["modality"])
        if m in modalities and cols["input_shape"][i] is not None and cols["undecodable"][i] is None
    ]  # fmt: skip
    return todo, cols


def row_inputs(batch, cols: dict[str, list], rows: list[int]) -> list[np.ndarray]:
    """The decoded arrays of the rows at positions ``rows`` (increasing), each a view into the batch's Arrow
    memory. Nothing is copied: taking a value out of an Arrow array as a scalar copies it (50 us for one
    224 x 224 image, a quarter of a GPU actor's time per record)."""
    column = batch.column("inputs")
    out: list[np.ndarray] = []
    chunks, k, start, end = column.chunks, -1, 0, 0
    offsets = data = None
    for i in rows:
        while i >= end:
            k += 1
            start, end = end, end + len(chunks[k])
            offsets, data = _binary_buffers(chunks[k])
        j = i - start
        out.append(input_array(data[offsets[j] : offsets[j + 1]], cols["input_shape"][i], cols["modality"][i]))
    return out


def _binary_buffers(chunk) -> tuple[np.ndarray, np.ndarray]:
    """(value offsets, value bytes) of a (large) binary Arrow array, as numpy views of its buffers."""
    import pyarrow as pa

    _, offsets, data = chunk.buffers()
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    offsets = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
    return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8))


def frame_runs(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Images (H, W, 3) and videos (F, H, W, 3), in order, as the fewest (N, H, W, 3) arrays: arrays that lie back
    to back in memory (consecutive rows of one Arrow chunk, as :func:`row_inputs` gives them) are joined into one
    view, without a copy."""
    runs: list[np.ndarray] = []
    group: list[np.ndarray] = []
    end = -1
    for a in arrays:
        f = a[None] if a.ndim == 3 else a
        at = f.__array_interface__["data"][0]
        if not (group and at == end and f.flags.c_contiguous and f.shape[1:] == group[0].shape[1:]
                and f.dtype == group[0].dtype):  # fmt: skip
            runs.extend(_joined(group))
            group = []
        group.append(f)
        end = at + f.nbytes
    runs.extend(_joined(group))
    return runs


_STAGING: dict[Any, tuple[Any, Any]] = {}  # CUDA device -> (pinned host buffer, event: its last copy is done)


def device_bytes(parts: list[np.ndarray], device: Any = "cpu"):
    """The bytes of ``parts`` (uint8 arrays, any shape), back to back, as one flat uint8 tensor on ``device``.

    To a CUDA device they go through one pinned host buffer, reused by the next call, in one copy the host does
    not wait for. Copied from Arrow's (pageable) memory, the driver stages each copy itself and the host waits for
    it: on an H100 one batch of 256 of the sample's images sent as decoded took 29 such copies, which with 8 reads
    of sizes back (since removed) held the CLIP actor 7.8 ms of its 30 ms resize. Where pinned memory cannot be
    had, the copies are pageable as before. On the CPU a single part comes back as a read-only view of its memory,
    without a copy."""
    import torch

    with warnings.catch_warnings():  # views into Arrow memory are read-only; torch only reads them here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        if len(parts) == 1 and torch.device(device).type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(parts[0]).reshape(-1))
        total = sum(p.nbytes for p in parts)
        out = torch.empty(total, dtype=torch.uint8, device=device)
        host = _pinned(out.device, total) if out.device.type == "cuda" else None
        target = host[:total] if host is not None else out
        at = 0
        for p in parts:
            target[at : at + p.nbytes].copy_(torch.from_numpy(p.reshape(-1)))
            at += p.nbytes
    if host is not None:
        out.copy_(target, non_blocking=True)
        _STAGING[out.device][1].record()
    return out


def to_device(values, device: Any = "cpu", dtype: Any = None):
    """``values`` (a numpy array, a sequence, or a CPU tensor) as a tensor on ``device``, in ``dtype`` if given
    (else numpy's: int64 for Python ints), without the host waiting for the device.

    A copy to a GPU from pageable memory, which ``torch.tensor(x, device="cuda")`` makes, is a copy and a stream
    synchronize (PyTorch's ``memcpy_and_sync``): the host waits until every kernel queued before it has run. In the
    middle of an actor's batch that left the GPU without work while the host waited, and the host queued the next
    kernels only after. To a CUDA device the values go through pinned memory (PyTorch's caching host allocator,
    which keeps each block until its copy is done) in a copy the host does not wait for; where pinned memory
    cannot be had, and on other devices, the copy is a plain one."""
    import torch

    with warnings.catch_warnings():  # read-only views of Arrow memory: torch only reads them here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        t = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if dtype is not None:
        t = t.to(dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    try:
        t = t.pin_memory()
    except RuntimeError:  # a locked-memory limit
        return t.to(device)
    return t.to(device, non_blocking=True)


def _pinned(device: Any, size: int):
    """This process's pinned buffer for copies to ``device``, of at least ``size`` bytes, once the last copy out of
    it is done; ``None`` where pinned memory cannot be had (a locked-memory limit)."""
    import torch

    buf, done = _STAGING.get(device, (None, None))
    if done is not None:
        done.synchronize()
    if buf is None or buf.numel() < size:
        try:
            buf = torch.empty(max(size, 2 * (buf.numel() if buf is not None else 0)), dtype=torch.uint8,
                              pin_memory=True)  # fmt: skip
        except RuntimeError:
            return None
        _STAGING[device] = (buf, torch.cuda.Event())
    return buf


def _joined(group: list[np.ndarray]) -> list[np.ndarray]:
    """Arrays that lie back to back in memory, in order, as one view (the first array's, extended)."""
    from numpy.lib.stride_tricks import as_strided

    if len(group) < 2 or not group[0].flags.c_contiguous:
        return group
    frames = sum(g.shape[0] for g in group)
    return [as_strided(group[0], shape=(frames, *group[0].shape[1:]), writeable=False)]
