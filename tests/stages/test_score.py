"""The score stage: stored scores and embeddings (the dedup stage's contract), resume, undecodable media, the
scorers' building blocks, and resource sizing that fits every actor pool on two cores."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import ScoreConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


# -- building blocks ------------------------------------------------------------------------------------------------


@pytest.mark.quick
def test_decoded_inputs_column_holds_each_arrays_bytes():
    """The decode step's ``inputs`` column, built from the arrays in one copy: the same column as from each array's
    bytes, with nulls, float32 audio, an empty array and a non-contiguous view; and readable back in place."""
    from curation.scoring.decode import binary_column, input_array, row_inputs

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (3, 4, 3), np.uint8), None, rng.random((1, 5, 7)).astype(np.float32),
              np.zeros(0, np.uint8), None, rng.integers(0, 256, (2, 2, 2, 3), np.uint8)[:, ::-1]]  # fmt: skip
    column = binary_column(arrays)
    column.validate(full=True)
    assert column.equals(pa.array([None if a is None else a.tobytes() for a in arrays], pa.large_binary()))
    assert binary_column([None, None]).null_count == 2 and len(binary_column([])) == 0
    batch = pa.table({"inputs": column})
    cols = {"input_shape": [None if a is None else list(a.shape) for a in arrays],
            "modality": ["image", None, "audio", "image", None, "video"]}  # fmt: skip
    back = row_inputs(batch, cols, [0, 2, 3, 5])
    assert all(np.array_equal(b, arrays[i]) for b, i in zip(back, [0, 2, 3, 5]))
    assert np.array_equal(input_array(column[5].as_buffer(), [2, 2, 2, 3], "video"), arrays[5])


@pytest.mark.quick
def test_device_bytes_joins_parts_in_order_and_views_a_single_part_on_the_cpu():
    """What the actors copy to their device: every part's bytes back to back, a non-contiguous view's too; on the
    CPU one part is read in place (no copy)."""
    import torch

    from curation.scoring.decode import device_bytes

    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, (2, 3, 3), np.uint8), rng.integers(0, 256, (4, 5, 3), np.uint8)[:, ::2],
             np.zeros(0, np.uint8), rng.integers(0, 256, 7, np.uint8)]  # fmt: skip
    joined = device_bytes(parts)
    assert joined.dtype == torch.uint8
    assert np.array_equal(joined.numpy(), np.concatenate([p.reshape(-1) for p in parts]))
    one = device_bytes(parts[:1])
    assert one.data_ptr() == parts[0].__array_interface__["data"][0]
    assert np.array_equal(one.numpy(), parts[0].reshape(-1))


@pytest.mark.quick
def test_small_host_values_reach_the_device_as_torch_tensor_makes_them():
    """The actors' small uploads (sizes, indices, means, tokens) go through ``to_device``, pinned and without a
    wait on a GPU: the same values and dtypes as ``torch.tensor`` (int64 for Python ints, float32 when asked), a
    read-only Arrow view without a warning, and a CPU tensor as it is."""
    import warnings

    import torch

    from curation.scoring.decode import to_device

    for values, dtype in (
        ([3, 1, 2], None),
        ((0.48145466, 0.4578275), torch.float32),
        (np.arange(6, dtype=np.int32), None),
    ):
        want, got = torch.tensor(values, dtype=dtype), to_device(values, "cpu", dtype)
        assert got.dtype == want.dtype and torch.equal(got, want), values
    view = np.arange(4)
    view.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert to_device(view).tolist() == [0, 1, 2, 3]
    t = torch.arange(3)
    assert to_device(t) is t


@pytest.mark.quick
def test_decoders_sample_frames_resample_audio_and_reject_garbage(sample_dir, labels):
    from curation.scoring.decode import DecodeError, decode_audio, open_image, sample_video_frames

    video = next(r for r in labels if r["modality"] == "video" and r["defect"] is None)
    frames = sample_video_frames((sample_dir / video["path"]).read_bytes(), 8)
    assert len(frames) == 8 and frames[0].mode == "RGB"
    assert len(sample_video_frames((sample_dir / video["path"]).read_bytes(), 64)) == 64  # short clip: repeats
    audio = next(r for r in labels if r["modality"] == "audio" and r["defect"] is None)
    attrs = json.loads(audio["attrs"])
    wave = decode_audio((sample_dir / audio["path"]).read_bytes(), 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) / 16000 - attrs["duration"]) < 0.05
    assert len(decode_audio((sample_dir / audio["path"]).read_bytes(), 16000, max_seconds=0.25)) == 4000
    for fn in (lambda b: open_image(b), lambda b: sample_video_frames(b, 4), lambda b: decode_audio(b, 16000)):
        with pytest.raises(DecodeError):
            fn(b"\x5a\x71\x13\x07" + bytes(range(200)) * 20)


def resampled(data: bytes, rate: int, max_seconds: float | None = None) -> np.ndarray:
    """The reference for ``decode_audio``: every frame through FFmpeg's resampler (default probe), cut as it cuts."""
    import io

    import av

    limit = int(max_seconds * rate) if max_seconds else None
    chunks, got = [], 0
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(audio=0):
            chunks += [o.to_ndarray().reshape(-1) for o in resampler.resample(frame)]
            got = sum(len(c) for c in chunks)
            if limit is not None and got >= limit:
                break
        else:
            chunks += [o.to_ndarray().reshape(-1) for o in resampler.resample(None)]
    return np.concatenate(chunks)[:limit]


@pytest.mark.quick
def test_audio_decoding_reads_a_short_probe_and_gets_what_a_full_probe_gets():
    """decode_audio opens containers with a 4 KiB probe: for every container here, the samples must equal those of
    FFmpeg's default probe, also behind a 64 KiB ID3 tag."""
    import io

    import soundfile as sf

    from curation.scoring.decode import decode_audio

    t = np.arange(44100 * 2) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1) * 0.3
    id3 = b"ID3\x04\x00\x00" + bytes([0x00, 0x04, 0x00, 0x00]) + bytes(64 * 1024)  # syncsafe size: 64 KiB
    for fmt, subtype in [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")]:
        buf = io.BytesIO()
        sf.write(buf, stereo, 44100, format=fmt, subtype=subtype)
        data = buf.getvalue()
        ours = decode_audio(data, 16000)
        assert np.array_equal(ours, resampled(data, 16000)) and abs(len(ours) / 16000 - 2) < 0.1, fmt
        if fmt in ("FLAC", "MP3"):  # formats that carry ID3 tags in the wild
            assert np.array_equal(decode_audio(id3 + data, 16000), resampled(id3 + data, 16000)), fmt


@pytest.mark.quick
def test_mono_audio_at_the_rate_skips_the_resampler_and_gets_its_samples_bit_for_bit(sample_dir, labels):
    """Mono frames already at the target rate become float32 without FFmpeg's resampler: the samples must be the
    resampler's, bit for bit, for every sample clip (16, 22.05 and 44.1 kHz, mono and stereo) at three rates and
    two cuts, and for generated mono clips in each sample format that is converted directly (s16, s32, flt, fltp)."""
    import io

    import av
    import soundfile as sf

    from curation.scoring import decode

    def formats(data: bytes) -> set[str]:
        with av.open(io.BytesIO(data)) as container:
            return {f.format.name for f in container.decode(audio=0) if len(f.layout.channels) == 1}

    clips = [(sample_dir / r["path"]).read_bytes() for r in labels if r["modality"] == "audio" and r["defect"] is None]
    t = np.arange(16000 * 2) / 16000
    mono = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)
    direct: set[str] = set()
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"),
                         ("WAV", "PCM_32"), ("OGG", "VORBIS")]:  # fmt: skip
        buf = io.BytesIO()
        sf.write(buf, mono, 16000, format=fmt, subtype=subtype)
        clips.append(buf.getvalue())
        direct |= formats(buf.getvalue()) & set(decode._AS_FLOAT)
    assert direct == {"s16", "s32", "flt", "fltp"}, direct  # each directly converted format is compared below
    for data in clips:
        for rate in (16000, 22050, 48000):
            for cut in (None, 0.3):
                ours = decode.decode_audio(data, rate, cut)
                assert ours.dtype == np.float32 and np.array_equal(ours, resampled(data, rate, cut)), (rate, cut)


@pytest.mark.quick
def test_sampled_video_frames_are_pyavs_own_rgb_frames(sample_dir, labels):
    """sample_video_frames converts frames through one shared swscale context and decodes with one thread: each
    frame must equal PyAV's own ``to_image()`` of the frame at that index, for every codec in the sample and on
    each path (frame count from the probe, from the container, unknown, and seeking in a long clip)."""
    import io

    import av

    from curation.scoring.decode import _uniform_indices, sample_video_frames

    def same(got: list, want: list[np.ndarray]) -> bool:
        return len(got) == len(want) and all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want))

    codecs: set[str] = set()
    stated: set[bool] = set()  # whether the container states its frame count (mp4) or not (webm): both paths run
    for row in labels:
        codec = json.loads(row["attrs"]).get("codec") if row["modality"] == "video" else None
        if codec is None or row["defect"] is not None or codec in codecs:
            continue
        codecs.add(codec)
        data = (sample_dir / row["path"]).read_bytes()
        with av.open(io.BytesIO(data)) as container:
            stated.add(bool(container.streams.video[0].frames))
            ref = [np.asarray(f.to_image()) for f in container.decode(video=0)]
        want = [ref[i] for i in _uniform_indices(len(ref), 6)]
        assert same(sample_video_frames(data, 6, num_frames=len(ref)), want), codec  # the crawl probe's count
        assert same(sample_video_frames(data, 6), want), codec  # the container's count, or none
        seeked = sample_video_frames(data, 3, max_seconds=0.01)  # a "long" clip: sampled by seeking
        assert len(seeked) == 3 and all(any(np.array_equal(np.asarray(s), r) for r in ref) for s in seeked), codec
    assert codecs == {"libx264", "mpeg4", "libvpx", "libvpx-vp9"} and stated == {True, False}


@pytest.mark.quick
def test_fast_clap_features_equal_the_extractors_own(sample_dir, labels):
    from transformers import ClapFeatureExtractor

    from curation.models.bootstrap import tiny_clap_feature_extractor
    from curation.scoring.decode import audio_features, decode_audio

    paths = [sample_dir / r["path"] for r in labels if r["modality"] == "audio" and r["defect"] is None][:6]
    laion = ClapFeatureExtractor(padding="repeatpad", truncation="rand_trunc")  # laion/clap-htsat-unfused's setup
    fused = ClapFeatureExtractor()  # transformers' default: fusion, 4 channels
    for fe in (tiny_clap_feature_extractor(), laion, fused):
        waves = [decode_audio(p.read_bytes(), fe.sampling_rate) for p in paths]
        ours = audio_features(fe, waves)
        theirs = fe(waves, sampling_rate=fe.sampling_rate, return_tensors="np")["input_features"]
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-3


@pytest.mark.quick
def test_clap_log_mels_made_on_the_actors_device_equal_the_decode_tasks(sample_dir, labels):
    """With a GPU the decode tasks send the clips' samples and the CLAP actor makes their log-mels in one torch
    computation: for every padding mode, clips shorter than, as long as and longer than the maximum, and one of a
    single sample, they must equal the tasks' own (numpy) log-mels, and the model inputs from either be the same."""
    from transformers import ClapFeatureExtractor

    from curation.models.bootstrap import tiny_clap_feature_extractor
    from curation.scoring.decode import AudioFeatures, decode_audio

    paths = [sample_dir / r["path"] for r in labels if r["modality"] == "audio" and r["defect"] is None][:4]
    extractors = [tiny_clap_feature_extractor(), ClapFeatureExtractor(padding="repeat", truncation="rand_trunc"),
                  ClapFeatureExtractor(padding="repeatpad", truncation="rand_trunc"), ClapFeatureExtractor()]  # fmt: skip
    seen = set()
    for fe in extractors:
        features = AudioFeatures.of(fe)
        seen.add((features.padding, features.channels))
        waves = [decode_audio(p.read_bytes(), fe.sampling_rate) for p in paths]
        long = np.concatenate(waves * (features.max_samples // sum(map(len, waves)) + 2))
        waves += [long, long[: features.max_samples], long[:1]]
        assert len(long) > features.max_samples
        ours = features.log_mel_on(waves).numpy()
        theirs = np.stack([features.mel(w)[0] for w in waves])
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 1e-4, features.padding
        from_waves, from_mels = features.model_inputs(waves), features.model_inputs([features.mel(w) for w in waves])
        assert from_waves.shape == (len(waves), features.channels, *theirs.shape[1:])
        assert (from_waves - from_mels).abs().max() < 1e-4
        mixed = features.model_inputs([waves[0], features.mel(waves[1])])  # either kind, in order
        assert (mixed - from_mels[:2]).abs().max() < 1e-4
    assert seen == {("pad", 1), ("repeat", 1), ("repeatpad", 1), ("repeatpad", 4)}


@pytest.mark.quick
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator settings: Linux only")
def test_decode_workers_reuse_freed_memory_instead_of_faulting_in_fresh_pages():
    """keep_freed_memory (called by every decode task): a clip's log-mel buffers come from memory the process freed
    before, not from pages the kernel maps and zeroes anew for every clip, as glibc's defaults do."""
    script = (
        "import resource, sys\n"
        "import numpy as np\n"
        "from curation.scoring.decode import AudioFeatures, keep_freed_memory\n"
        "print(keep_freed_memory() if sys.argv[1] == 'set' else 'default')\n"
        "f = AudioFeatures(sampling_rate=16000, max_samples=48000, padding='pad', n_fft=800, hop=400,\n"
        "                  filters=np.ones((401, 32)) / 800, channels=1)\n"
        "wave = np.random.default_rng(0).standard_normal(30000).astype(np.float32)\n"
        "for _ in range(3): f.mel(wave)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20): f.mel(wave)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)\n"
    )
    faults = {}
    for mode in ("default", "set"):
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=ROOT, check=True)
        took, per_clip = out.stdout.split()
        assert took in ("default", "True"), out.stdout
        faults[mode] = float(per_clip)
    assert faults["default"] > 100 and faults["set"] < 5, faults  # a clip's buffers are about 2 MB: 500 pages


@pytest.mark.quick
@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
def test_image_geometry_equals_open_clips_transform_pixel_for_pixel(resize_mode):
    """The decode tasks' resize and crop (plain PIL and numpy) against open_clip's own transform, on images larger,
    smaller, thinner and at the size of the target, square and not, for both interpolations and a pad colour."""
    from PIL import Image

    from curation.scoring.decode import ImagePreprocessor, image_transform

    rng = np.random.default_rng(0)
    shapes = [(48, 48), (300, 200), (200, 300), (47, 101), (20, 30), (49, 48), (1000, 37), (56, 40), (97, 97)]
    for interpolation in ("bicubic", "bilinear"):
        for size in (48, (40, 56), (56, 40)):
            cfg = {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": interpolation,
                   "resize_mode": resize_mode, "fill_color": 127}  # fmt: skip
            steps = image_transform(cfg).transforms
            geometry = steps[: next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)]
            ours = ImagePreprocessor(cfg)
            for w, h in shapes:
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                ref = img
                for step in geometry:
                    ref = step(ref)
                got = ours.pixels(img)
                assert np.array_equal(got, np.asarray(ref)), (interpolation, size, (w, h))


def random_frames(pre, rng, n: int = 24) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``n`` images and two-frame videos of random sizes (some at the model's size, three of those frames back to
    back; one a steep shrink), noise or edges and gradients (the filter's overshoot); and each frame as a decode
    task resizes it with PIL."""
    from PIL import Image

    fixed = {0: pre.hw, 1: (30, 900), 4: pre.hw, 5: pre.hw}  # 4 is a video
    arrays, want = [], []
    for i in range(n):
        h, w = fixed[i] if i in fixed else (int(v) for v in rng.integers(1, 160, 2))
        smooth = np.cumsum(rng.integers(-12, 13, (h, w, 3)), 1) + 128
        a = np.clip(smooth, 0, 255).astype(np.uint8) if i % 2 else rng.integers(0, 256, (h, w, 3), np.uint8)
        a = np.stack([a, a[::-1, ::-1]]) if i % 5 == 4 else a
        arrays.append(a)
        want += [pre.pixels(Image.fromarray(f)) for f in (a if a.ndim == 4 else [a])]
    return arrays, want


@pytest.mark.quick
def test_resizing_on_the_models_device_gives_pils_pixels_bit_for_bit(sample_dir, labels):
    """What a GPU actor does to images and frames sent at their decoded size (``resized``, in torch) against what a
    decode task does with PIL (``pixels``): random sizes shrunk and enlarged, Pillow's two pass orders, both
    interpolations, every resize mode with a pad colour, videos, frames already at the size, with the products in
    float64 (as on a CPU) and in float32 halves (as on a GPU, with float64 where a shrink is too steep for them);
    and the sample's own images and video frames as the decode step sends them."""
    import torch
    from PIL import Image

    from curation.scoring import decode, resample
    from curation.scoring.decode import DecodePlan, ImagePreprocessor, decode_one
    from curation.scoring.resample import horizontal_first

    rng = np.random.default_rng(1)
    orders, float32 = set(), set()  # Pillow's pass orders taken; (float32 devices, products in float32) seen
    exact = resample._float32_exact

    def spy(bands):
        used = exact(bands)
        float32.add((resample.FLOAT32_DEVICES, used))
        return used

    cfgs = [{"size": 48}, {"size": 48, "interpolation": "bilinear"}, {"size": (40, 56)},
            {"size": 48, "resize_mode": "longest", "fill_color": 127}, {"size": (56, 40), "resize_mode": "squash"}]  # fmt: skip
    for devices in ((), ("cpu",)):  # float64 products, then float32 ones
        for cfg in cfgs:
            pre = ImagePreprocessor(cfg)
            arrays, want = random_frames(pre, rng)
            orders |= {horizontal_first(a.shape[-3:-1], pre.geometry(*a.shape[-3:-1])[0]) for a in arrays}
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(resample, "FLOAT32_DEVICES", devices)
                mp.setattr(resample, "_float32_exact", spy)
                got = pre.resized(arrays).numpy()
            assert got.shape == (len(want), *pre.hw, 3)
            for i, (g, r) in enumerate(zip(got, want)):
                assert np.array_equal(g, r), (devices, cfg, i)
    assert orders == {True, False}  # both of Pillow's pass orders were taken
    assert float32 == {((), False), (("cpu",), True), (("cpu",), False)}  # float32, and float64 for steep shrinks
    pre = ImagePreprocessor(cfgs[0])  # in chunks of a few frames, and frames larger than a chunk on their own
    arrays, want = random_frames(pre, rng)
    chunks, resize_chunk = [], resample._resize_chunk

    def counted(flat, frames, *args):
        chunks.append(frames)
        return resize_chunk(flat, frames, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resample, "MAX_CHUNK_PIXELS", 6000)
        mp.setattr(resample, "_resize_chunk", counted)
        assert np.array_equal(pre.resized(arrays).numpy(), np.stack(want))
    assert len(chunks) > 4 and max(len(c) for c in chunks) > 1 and max(h * w for c in chunks for _, h, w in c) > 6000
    assert resample.chunk_pixels("cpu") == resample.MAX_CHUNK_PIXELS
    bands, matmul = torch.zeros((1, 1, 32, 40), dtype=torch.float64), torch.backends.mkldnn.matmul
    with pytest.MonkeyPatch.context() as mp:  # no float32 halves where the products round their inputs
        mp.setattr(resample, "FLOAT32_DEVICES", ("cpu",))
        assert resample._float32_exact(bands)
        kept, matmul.fp32_precision = matmul.fp32_precision, "bf16"
        try:
            assert not resample._float32_exact(bands)
        finally:
            matmul.fp32_precision = kept
    # the stage's check that the installed Pillow resizes this way, and that it notices a wrong pass order
    assert resample.matches_pil()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(resample, "horizontal_first", lambda src, new: True)
        resample.matches_pil.cache_clear()
        assert not resample.matches_pil()
    resample.matches_pil.cache_clear()

    rows = [r for r in labels if r["modality"] in ("image", "video") and r["defect"] is None][:60]
    for cfg in ({"size": 224}, {"size": 64}):  # the sample's images are enlarged and shrunk
        plan = DecodePlan(image=cfg, video=cfg, video_frames=2)
        sent = DecodePlan(image=cfg, video=cfg, video_frames=2, pixels_as_decoded=True)
        data = [(sample_dir / r["path"]).read_bytes() for r in rows]
        want = np.concatenate([np.reshape(decode_one(d, r["modality"], plan), (-1, *ImagePreprocessor(cfg).hw, 3))
                               for d, r in zip(data, rows)])  # fmt: skip
        as_decoded = [decode_one(d, r["modality"], sent) for d, r in zip(data, rows)]
        assert sum(a.shape[-3:-1] != (cfg["size"],) * 2 for a in as_decoded) > len(rows) // 2
        assert np.array_equal(ImagePreprocessor(cfg).resized(as_decoded).numpy(), want)

    # a clip whose frames change size midway is resized in its task, to one size
    frames = [Image.fromarray(rng.integers(0, 256, (h, 40, 3), dtype=np.uint8)) for h in (30, 32)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "sample_video_frames", lambda *args: frames)
        assert decode_one(b"", "video", sent).shape == (2, 64, 64, 3)


def test_decode_tasks_import_no_model_library(sample_dir, labels, bootstrap_models, tmp_path):
    """A new decode worker must start light: the score stage's decode plan, unpickled in a fresh interpreter,
    decodes an image, a video and an audio clip, and the LM's ids step tokenizes, without importing torch,
    open_clip or transformers (importing them took 5.7 s of CPU in every new worker process)."""
    import pickle

    from curation.stages.base import StageContext
    from curation.stages.score import ScoreStage

    config = load_config(data={"name": "t", "stages": ["score"]})
    stage = ScoreStage(StageContext(tmp_path, config))
    plan, _ = stage._plan(ScoreConfig(), ["image_text", "video_text", "audio_text"])
    rows = {m: next(r for r in labels if r["modality"] == m and r["defect"] is None and r["path"].startswith("media/"))
            for m in ("image", "video", "audio")}  # fmt: skip
    (tmp_path / "plan.pkl").write_bytes(pickle.dumps(plan))
    (tmp_path / "tokens.pkl").write_bytes(pickle.dumps(stage._lm_tokens(ScoreConfig())))  # the LM's ids step
    script = (
        "import pickle, sys\n"
        "import pyarrow as pa\n"
        "from curation.scoring.decode import decode_one\n"
        "from curation.scoring.perplexity import add_lm_ids\n"
        f"plan = pickle.loads(open({str(tmp_path / 'plan.pkl')!r}, 'rb').read())\n"
        f"tokens = pickle.loads(open({str(tmp_path / 'tokens.pkl')!r}, 'rb').read())\n"
        "print(add_lm_ids(pa.table({'caption': ['a red circle']}), tokens).column('lm_ids')[0].as_py()[0])\n"
        + "".join(
            f"print(decode_one(open({str(sample_dir / r['path'])!r}, 'rb').read(), {m!r}, plan).shape)\n"
            for m, r in rows.items()
        )  # fmt: skip
        + "print(sorted(m for m in ('torch', 'open_clip', 'transformers', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines.pop(0) == "1"  # the LM's first id: its beginning-of-text token
    size = plan.image["size"]
    assert lines[0] == str((size, size, 3)) and lines[1] == str((8, size, size, 3)) and lines[2].startswith("(1, ")
    assert lines[-1] == "[]", out.stdout


@pytest.mark.quick
def test_images_sent_at_their_decoded_size_score_as_those_resized_in_the_tasks(bootstrap_models, sample_dir, labels):
    """A GPU stage's decode tasks send images and frames unresized and the CLIP actor resizes them: the scorer's
    batch path gives exactly the scores and embeddings of the tasks resizing them, here on the CPU. An image over
    the area limit is still resized in its task, and both kinds mix in one batch."""
    from curation.scoring import decode
    from curation.scoring.clip_similarity import ClipSimilarityScorer
    from curation.scoring.decode import DecodePlan, decode_one

    scorer = ClipSimilarityScorer(ScoreConfig.Model())
    cfg = scorer.model.visual.preprocess_cfg
    rows = [r for r in labels if r["modality"] in ("image", "video") and r["defect"] is None][:24]

    def table(plan):
        arrays = [decode_one((sample_dir / r["path"]).read_bytes(), r["modality"], plan) for r in rows]
        return arrays, pa.table({
            "modality": [r["modality"] for r in rows], "caption": [r["caption"] for r in rows],
            "inputs": pa.array([a.tobytes() for a in arrays], pa.large_binary()),
            "input_shape": [list(a.shape) for a in arrays], "undecodable": pa.nulls(len(rows), pa.string()),
        })  # fmt: skip

    resized, in_tasks = table(DecodePlan(image=cfg, video=cfg, video_frames=3))
    sizes = sorted(np.prod(a.shape[-3:-1]) for a in table(DecodePlan(image=cfg, video=cfg, video_frames=3,
                                                                     pixels_as_decoded=True))[0])  # fmt: skip
    # the limit between the sample's two largest images: the largest is resized in its task, the rest are not
    limit = (sizes[-2] + 1) / np.prod(scorer.preprocess.hw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode, "AS_DECODED_MAX_AREA", limit)
        as_decoded, unresized = table(DecodePlan(image=cfg, video=cfg, video_frames=3, pixels_as_decoded=True))
    at_size = [a.shape[-3:-1] == scorer.preprocess.hw for a in as_decoded]
    assert 0 < sum(at_size) < len(rows) // 2, at_size
    want, got = scorer(in_tasks), scorer(unresized)
    for column in ("clip_score", "embedding"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist()


@pytest.mark.quick
def test_clip_tokens_made_in_tasks_score_as_the_actors_own(bootstrap_models):
    """With GPUs the captions' CLIP tokens are made in the tasks before the actor: they equal the model's own
    tokenizer's, only for the rows the CLIP actor scores, and the scores are identical to the actor tokenizing."""
    from curation.models.clip import load_clip_tokenizer
    from curation.scoring.clip_similarity import TOKENS_COLUMN, ClipSimilarityScorer, add_clip_tokens

    spec = ScoreConfig.Model()
    scorer = ClipSimilarityScorer(spec)
    size = scorer.model.visual.preprocess_cfg["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    rng = np.random.default_rng(0)
    rows = [("image", "a red circle"), ("audio", "two short beeps"), ("video", "a blue square moving left"),
            ("image", None), ("image", "ein rotes Quadrat, größer"), ("image", "x " * 200)]  # fmt: skip
    arrays = [rng.integers(0, 255, (*hw, 3) if m == "image" else (2, *hw, 3), dtype=np.uint8) for m, _ in rows]

    def part(sl):
        return pa.table({
            "modality": [m for m, _ in rows[sl]], "caption": pa.array([c for _, c in rows[sl]], pa.string()),
            "inputs": pa.array([None if m == "audio" else a.tobytes() for (m, _), a in zip(rows[sl], arrays[sl])],
                               pa.large_binary()),
            "input_shape": pa.array([None if m == "audio" else list(a.shape) for (m, _), a in zip(rows[sl], arrays[sl])],
                                    pa.list_(pa.int32())),
            "undecodable": pa.nulls(len(rows[sl]), pa.string()),
        })  # fmt: skip

    # a block with no row for the CLIP actor (audio only) still joins the others
    blocks = [add_clip_tokens(part(sl), spec) for sl in (slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 6))]
    batch = pa.concat_tables(blocks)
    tokens = batch.column(TOKENS_COLUMN).to_pylist()
    want = load_clip_tokenizer(spec)([c or "" for m, c in rows if m != "audio"]).tolist()
    assert tokens[1] is None and [t for t in tokens if t is not None] == want
    with_tokens = scorer(batch)
    without = scorer(batch.drop_columns([TOKENS_COLUMN]))
    assert TOKENS_COLUMN not in with_tokens.column_names
    assert with_tokens.column("clip_score").to_pylist() == without.column("clip_score").to_pylist()
    assert with_tokens.column("clip_score").null_count == 1  # the audio row is not this scorer's
    assert with_tokens.column("embedding").to_pylist() == without.column("embedding").to_pylist()


@pytest.mark.quick
@pytest.mark.parametrize("binary", [pa.binary(), pa.large_binary()])
def test_actors_read_decoded_inputs_in_place_and_send_adjacent_rows_as_one_array(binary):
    """The media actors view each row's decoded array in the batch's Arrow memory (no copy), across chunks and
    sliced chunks, and consecutive rows of a chunk reach the model as one array, equal to the rows joined."""
    import torch

    from curation.scoring.decode import ImagePreprocessor, frame_runs, media_rows, row_inputs

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (5, 4, 3), dtype=np.uint8) for _ in range(7)]
    video = rng.integers(0, 255, (3, 5, 4, 3), dtype=np.uint8)
    arrays = [*images[:3], video, None, *images[3:]]  # row 4: undecodable

    def table(part):
        return pa.table({
            "modality": ["video" if a is video else "image" for a in part], "caption": ["c"] * len(part),
            "inputs": pa.array([None if a is None else a.tobytes() for a in part], binary),
            "input_shape": pa.array([None if a is None else list(a.shape) for a in part], pa.list_(pa.int32())),
            "undecodable": pa.array(["bad" if a is None else None for a in part], pa.string()),
        })  # fmt: skip

    # three chunks, the middle one sliced out of a larger array (a non-zero offset into its buffers)
    batch = pa.concat_tables([table(arrays[:2]), table([images[0], *arrays[2:6]]).slice(1), table(arrays[6:])])
    assert batch.column("inputs").num_chunks == 3
    todo, cols = media_rows(batch, ("image", "video"))
    assert todo == [0, 1, 2, 3, 5, 6, 7, 8]
    got = row_inputs(batch, cols, todo)
    want = [a for a in arrays if a is not None]
    assert all(g.shape == w.shape and np.array_equal(g, w) for g, w in zip(got, want))
    inside = []
    for i, g in zip(todo, got):  # each a view into its chunk's value buffer
        chunk = batch.column("inputs").chunk(0 if i < 2 else 1 if i < 6 else 2)
        data = chunk.buffers()[2]
        inside.append(data.address <= g.ctypes.data and g.ctypes.data + g.nbytes <= data.address + data.size)
    assert all(inside)

    runs = frame_runs(got)
    # rows 0-1 (chunk 0); 2, 3 (a video) and 5 (chunk 1: the undecodable row 4 holds no bytes); 6-8 (chunk 2)
    assert [r.shape[0] for r in runs] == [2, 1 + 3 + 1, 3]
    images_only = media_rows(batch, ("image",))[0]  # the video's bytes now lie between rows 2 and 5
    assert [r.shape[0] for r in frame_runs(row_inputs(batch, cols, images_only))] == [2, 1, 1, 3]
    joined = np.concatenate([a[None] if a.ndim == 3 else a for a in want])
    assert np.array_equal(np.concatenate(runs), joined)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    assert torch.equal(ImagePreprocessor.to_tensor(runs, mean, std), ImagePreprocessor.to_tensor(joined, mean, std))


@pytest.mark.quick
def test_text_quality_statistics_follow_gopher():
    from curation.scoring.text_quality import TextQualityScorer

    texts = ["a small red circle in the top left, on a white background", "#@!zq $$ ^&*", "the the the the the the"]
    out = TextQualityScorer()(pa.table({"caption": texts})).to_pydict()
    assert out["text_words"] == [12, 1, 6]
    assert out["text_alpha_words_ratio"][0] > 0.9 and out["text_alpha_words_ratio"][1] < 0.5
    assert out["text_stop_words"][0] == 1 and out["text_type_token_ratio"][2] == pytest.approx(1 / 6)
    assert out["text_dup_5gram_ratio"][2] > 0.1 and out["text_dup_5gram_ratio"][0] == 0


@pytest.mark.quick
def test_lm_token_ids_made_in_tasks_score_as_the_actors_own(bootstrap_models, labels):
    """The LM's ids a task adds (the ``tokenizers`` library alone) are the transformers tokenizer's, and the actor
    scores them as it scores captions it tokenizes itself, sliced blocks included."""
    import pickle

    from curation.scoring.perplexity import IDS_COLUMN, LmTokens, PerplexityScorer, add_lm_ids

    spec = ScoreConfig.Model()
    scorer = PerplexityScorer(spec)
    captions = [r["caption"] for r in labels][:300] + ["", "  ", "\u00fcn\u00efc\u00f6d\u00e9\u00a0text", "x " * 400]
    bos, most = scorer.tokenizer.bos_token_id, scorer.max_tokens
    want = [x if x[:1] == [bos] else ([bos] + x)[:most]
            for x in scorer.tokenizer(captions, truncation=True, max_length=most)["input_ids"]]  # fmt: skip
    assert max(len(x) for x in want) == most  # the long caption is cut at the model's context
    tokens = pickle.loads(pickle.dumps(LmTokens.for_model(spec)))  # as a task receives it
    assert tokens.encode(captions) == want
    n = len(captions)
    table = pa.table({"uid": [f"u{i}" for i in range(n)], "shard": ["a"] * (n // 2) + ["b"] * (n - n // 2),
                      "caption": captions})  # fmt: skip
    with_ids = add_lm_ids(table, tokens)
    assert with_ids.column(IDS_COLUMN).to_pylist() == want
    for rows in (slice(0, n), slice(7, n - 5)):
        a, b = scorer(with_ids[rows]), scorer(table[rows])
        assert IDS_COLUMN not in a.column_names and a.column("uid").equals(b.column("uid"))
        assert a.column("perplexity").to_pylist() == b.column("perplexity").to_pylist()
    got = scorer(with_ids).column("perplexity").to_pylist()
    assert got[n - 4] is None and got[n - 3] is None and all(p > 1 for p in got[: n - 4])
    scorer.tokens = None  # a tokenizer without a Rust backend: the actor tokenizes through transformers
    assert scorer.encode(captions) == want and scorer(table).column("perplexity").to_pylist() == got


@pytest.mark.quick
def test_language_id_lines_made_in_tasks_predict_as_fasttexts_own_api(labels):
    """fastText's input lines, made column-wise (in a task or in the actor), give exactly the predictions of
    fastText's public ``predict`` on the whitespace-normalised caption; blank captions get no language."""
    from curation.scoring.language import LINES_COLUMN, LanguageIdScorer, add_lid_lines, fasttext_lines

    scorer = LanguageIdScorer(ScoreConfig.Model(name="lid.176", batch_size=64))
    odd = ["line one\nline two in english", "Ein\u00a0roter Kreis\u2003oben links\n", "tab\tseparated\x1cwords",
           "", "   \t", "\u3000\u00a0", "\x1c\x1d", "naïve café  on a  white background", "\u2028x",
           "  two  spaces and trailing ones  "]  # fmt: skip
    captions = [r["caption"] for r in labels][:200] + odd
    n = len(captions)
    lines = fasttext_lines(pa.chunked_array([captions[:50], captions[50:]]))  # a block of two chunks
    blank = [i for i, c in enumerate(captions) if not c.split()]
    assert [i for i, line in enumerate(lines.to_pylist()) if line is None] == blank and len(blank) == 4
    assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines.drop_null().to_pylist())
    table = pa.table({"uid": [f"u{i}" for i in range(n)], "caption": captions})
    want_lang, want_score = [], []
    for c in captions:
        if not c.split():
            want_lang.append(None)
            want_score.append(None)
            continue
        labels, probs = scorer.model.predict([" ".join(c.split())], k=1)  # (its one-string form fails on numpy 2)
        want_lang.append(labels[0][0].removeprefix("__label__"))
        want_score.append(min(1.0, float(probs[0][0])))
    with_lines = add_lid_lines(table)
    for rows in (slice(0, n), slice(9, n - 2)):
        a, b = scorer(with_lines[rows]), scorer(table[rows])
        assert LINES_COLUMN not in a.column_names and a.column("uid").equals(b.column("uid"))
        assert a.column("lang").to_pylist() == b.column("lang").to_pylist() == want_lang[rows]
        assert a.column("lang_score").to_pylist() == b.column("lang_score").to_pylist()
        assert np.allclose(np.array(a.column("lang_score").to_pylist()[: 200 - 9], dtype=float),
                           want_score[rows][: 200 - 9], rtol=1e-6)  # fmt: skip
    assert want_lang[200] == "en" and want_lang[201] == "de"


@pytest.mark.quick
def test_actor_pools_fit_the_cluster_and_take_gpus_when_there_are_some():
    from curation.stages.score import SMALL_TASK_CPUS, _fit_cpus, _pool_kwargs, decode_cpus, small_tasks

    cfg = ScoreConfig()
    models = [cfg.image_text, cfg.audio_text, cfg.perplexity, cfg.language]

    def fits(cluster_cpus: float, gpus: float = 0) -> bool:
        pools = [_pool_kwargs(m, gpus=gpus) for m in models]
        decode = _fit_cpus(pools, decode_cpus(cfg, gpus), cluster_cpus)
        actors = sum(k["num_cpus"] * k["concurrency"] for k in pools)
        # every pool, one decode task and the small index/text tasks can hold their CPUs at the same time
        small = 2 * SMALL_TASK_CPUS * small_tasks(cluster_cpus)
        return actors + decode + small <= cluster_cpus + 1e-9 and decode > 0

    # the defaults fit 2 cores untouched; 1 core gets scaled reservations; so do GPU machines
    assert fits(2) and fits(1) and fits(16) and fits(16, gpus=1) and fits(2, gpus=1)
    # one light task at a time on small machines (each would start a worker); more where cores would sit idle
    assert [small_tasks(c) for c in (1, 2, 4, 16)] == [1, 1, 1, 4]
    pools = [_pool_kwargs(m, gpus=0) for m in models]
    assert _fit_cpus(pools, decode_cpus(cfg, 0), 2) == decode_cpus(cfg, 0) == 0.5
    assert [k["num_cpus"] for k in pools] == [0.25] * 4 and all("num_gpus" not in k for k in pools)
    # with a GPU an actor's CPU work paces the GPU: a whole core for it, and whole cores for the decode tasks
    assert _pool_kwargs(cfg.image_text, gpus=1)["num_cpus"] == 1 and decode_cpus(cfg, 1) == 1
    assert _pool_kwargs(cfg.language, gpus=1, uses_gpu=False)["num_cpus"] == 0.25  # fastText stays on CPU
    set_by_user = ScoreConfig(decode_num_cpus=0.75, image_text=ScoreConfig.Model(num_cpus=0.5))
    assert decode_cpus(set_by_user, 1) == 0.75 and _pool_kwargs(set_by_user.image_text, gpus=1)["num_cpus"] == 0.5
    gpu = _pool_kwargs(cfg.image_text, gpus=2)
    # two actors a GPU, and the three model pools' defaults share each GPU without waiting on each other
    assert gpu["num_gpus"] == pytest.approx(1 / 6) and gpu["concurrency"] == 4
    one = [_pool_kwargs(cfg.image_text, 1), _pool_kwargs(cfg.audio_text, 1), _pool_kwargs(cfg.perplexity, 1, text=True)]
    assert sum(k["num_gpus"] * k["concurrency"] for k in one) == pytest.approx(1)
    assert "num_gpus" not in _pool_kwargs(cfg.language, gpus=2, uses_gpu=False)
    # text scorers take whole blocks a call on CPU; Ray Data refuses a GPU pool without a batch size
    assert _pool_kwargs(cfg.perplexity, gpus=0, text=True)["batch_size"] is None
    lm = _pool_kwargs(cfg.perplexity, gpus=1, text=True)
    assert lm["num_gpus"] == pytest.approx(1 / 6) and lm["batch_size"] == cfg.perplexity.batch_size
    assert _pool_kwargs(cfg.language, gpus=1, uses_gpu=False, text=True)["batch_size"] is None


@pytest.mark.quick
def test_text_only_runs_read_shards_in_large_blocks_but_enough_to_overlap():
    from curation.stages.score import MIN_TEXT_BLOCKS, TEXT_BLOCK_RECORDS, _num_blocks

    def shards(n: int, records: int) -> list[dict]:
        return [{"shard": f"{i:05d}", "uids": [f"u{i}-{j}" for j in range(records)]} for i in range(n)]

    assert _num_blocks(shards(40, 1000), media=True) == 40  # media: one shard a block, decoding spreads
    assert _num_blocks(shards(3, 1000), media=False) == 3  # no more blocks than shards
    assert _num_blocks(shards(40, 1000), media=False) == MIN_TEXT_BLOCKS  # small runs still overlap their steps
    big = shards(1200, 1000)  # 1.2 million captions: blocks of up to TEXT_BLOCK_RECORDS
    assert _num_blocks(big, media=False) == -(-1_200_000 // TEXT_BLOCK_RECORDS) > MIN_TEXT_BLOCKS


@pytest.mark.gpu
def test_model_scorers_on_gpu_match_cpu(bootstrap_models, sample_dir, labels):
    """On a GPU each model scorer runs in fp16, its inputs in the model's input dtype, and gives the CPU's scores;
    the CLIP actor's resize of images sent at their decoded size gives PIL's pixels there."""
    import torch

    from curation.models.hf import load_clap_feature_extractor
    from curation.scoring.clap_similarity import ClapSimilarityScorer
    from curation.scoring.clip_similarity import ClipSimilarityScorer
    from curation.scoring.decode import AudioFeatures, DecodePlan, ImagePreprocessor, decode_one
    from curation.scoring.perplexity import PerplexityScorer

    spec = ScoreConfig.Model()
    clean = {
        m: [r for r in labels if r["modality"] == m and r["defect"] is None][:12] for m in ("image", "video", "audio")
    }
    cpu, gpu = ClipSimilarityScorer(spec), ClipSimilarityScorer(spec, has_gpu=True)
    assert gpu.device.startswith("cuda") and cpu.dtype == torch.float32 and gpu.dtype == torch.float16
    assert next(gpu.model.visual.parameters()).device.type == "cuda"
    plan = DecodePlan(image=cpu.model.visual.preprocess_cfg, video=cpu.model.visual.preprocess_cfg, video_frames=4)
    plan.audio = AudioFeatures.of(load_clap_feature_extractor(spec))
    inputs = {m: ([decode_one((sample_dir / r["path"]).read_bytes(), m, plan) for r in rows],
                  [r["caption"] for r in rows]) for m, rows in clean.items()}  # fmt: skip
    mixed = (inputs["image"][0][:6] + inputs["video"][0][:6], inputs["image"][1][:6] + inputs["video"][1][:6])
    for arrays, captions in (inputs["image"], mixed):  # images alone, and images with videos (frames pooled)
        (want, want_emb), (got, got_emb) = cpu.score(arrays, captions), gpu.score(arrays, captions)
        assert got.shape == want.shape == (len(arrays),) and np.allclose(want, got, atol=2e-2)
        assert np.allclose(want_emb, got_emb, atol=2e-2) and np.allclose(np.linalg.norm(got_emb, axis=1), 1, atol=1e-3)
    # sent at their decoded size (as the stage does for a CLIP actor with a GPU), resized there: the same pixels
    plan.pixels_as_decoded = True
    rows = clean["image"][:6] + clean["video"][:6]
    unresized = [decode_one((sample_dir / r["path"]).read_bytes(), r["modality"], plan) for r in rows]
    pixels = gpu.preprocess.resized(unresized, gpu.device)
    assert pixels.device.type == "cuda"
    assert np.array_equal(pixels.cpu().numpy(), np.concatenate([a.reshape(-1, *a.shape[-3:]) for a in mixed[0]]))
    assert np.allclose(gpu.score(unresized, mixed[1])[0], gpu.score(*mixed)[0], atol=1e-5)
    from curation.scoring import resample

    rng = np.random.default_rng(2)  # random sizes, shrunk and enlarged: as this GPU runs them, and in float32 halves
    for fast_float64 in (resample.FAST_FLOAT64_GPUS, frozenset()):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(resample, "FAST_FLOAT64_GPUS", fast_float64)
            halves = resample._float32_exact(torch.zeros((1, 1, 1, 2), device="cuda"))
            assert halves == (torch.cuda.get_device_capability() not in fast_float64)
            for cfg in ({"size": 48}, {"size": 48, "interpolation": "bilinear"},
                        {"size": (56, 40), "resize_mode": "squash"}):  # fmt: skip
                pre = ImagePreprocessor(cfg)
                arrays, want = random_frames(pre, rng)
                assert np.array_equal(pre.resized(arrays, "cuda").cpu().numpy(), np.stack(want)), (cfg, halves)
    most = resample.chunk_pixels("cuda")  # larger chunks where the GPU has the memory: fewer kernel launches
    total = torch.cuda.get_device_properties(0).total_memory
    assert most & (most - 1) == 0 and most >= resample.MAX_CHUNK_PIXELS
    assert (
        most == resample.MAX_CHUNK_PIXELS or most * resample.CHUNK_BYTES_PER_PIXEL * resample.CHUNK_GPU_SHARE <= total
    )
    # no step of a batch makes the host wait for the GPU (a pageable copy, a size read back) before the scores are
    # read: the host queues the next kernels while the GPU runs the last ones
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu.embed_media(unresized)
        gpu.embed_text(mixed[1])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    from curation.scoring import decode  # copies to the GPU go through one pinned buffer, reused call after call

    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (5, 3 << 20, 0, 3)]
    first, second = decode.device_bytes(parts, "cuda"), decode.device_bytes(parts[::-1], "cuda")
    assert np.array_equal(first.cpu().numpy(), np.concatenate(parts))
    assert np.array_equal(second.cpu().numpy(), np.concatenate(parts[::-1]))
    assert decode._STAGING[first.device][0].is_pinned()

    cpu_clap, gpu_clap = ClapSimilarityScorer(spec), ClapSimilarityScorer(spec, has_gpu=True)
    assert gpu_clap.dtype == torch.float16
    want, got = cpu_clap.score(*inputs["audio"])[0], gpu_clap.score(*inputs["audio"])[0]
    assert np.allclose(want, got, atol=2e-2)
    plan.audio_waves = True  # as the stage decodes audio for a CLAP actor with a GPU: its log-mels made there
    waves = [decode_one((sample_dir / r["path"]).read_bytes(), "audio", plan) for r in clean["audio"]]
    assert all(w.ndim == 1 for w in waves)
    torch.cuda.set_sync_debug_mode("error")  # the CLAP actor's inputs, made on the GPU, without a wait either
    try:
        gpu_clap.features.model_inputs(waves, gpu_clap.device, gpu_clap.dtype)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    mels = gpu_clap.features.log_mel_on(waves, gpu_clap.device).cpu().numpy()
    assert np.abs(mels - np.stack([a[0] for a in inputs["audio"][0]])).max() < 1e-3
    assert np.allclose(want, gpu_clap.score(waves, inputs["audio"][1])[0], atol=2e-2)

    captions = [r["caption"] for rows in clean.values() for r in rows]
    cpu_lm, gpu_lm = PerplexityScorer(spec), PerplexityScorer(spec, has_gpu=True)
    assert next(gpu_lm.model.parameters()).dtype == torch.float16
    want = np.array(cpu_lm.perplexities(cpu_lm.encode(captions)))
    got = np.array(gpu_lm.perplexities(gpu_lm.encode(captions)))
    assert np.all(np.isfinite(got)) and np.allclose(np.log(want), np.log(got), atol=2e-2)


@pytest.mark.quick
def test_score_config_validates_with_keys():
    from curation.config import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config(data={"input": {"path": "x"}, "score": {"scorers": ["clip"], "video_frames": 0,
                          "image_text": {"precision": "fp8", "batch_size": 0}}})  # fmt: skip
    text = str(e.value)
    assert "score.scorers[0]: unknown scorer 'clip'" in text and "score.video_frames: must be >= 1" in text
    assert "score.image_text.precision: 'fp8'" in text and "score.image_text.batch_size: must be >= 1" in text
    assert load_config(ROOT / "pipelines" / "score.yaml").stages == ["crawl", "score", "filter"]


# -- the stage on the real pipeline ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_on_a_gpu_cluster_clip_tokens_and_clap_log_mels_leave_the_decode_tasks(scored_run, monkeypatch):
    """The stage's plan on a cluster with a GPU (the pipeline built, not run): the decode tasks send the clips'
    samples for the CLAP actor to make their log-mels and the images unresized for the CLIP actor to resize, and
    a task step makes the CLIP tokens; without a GPU, none of these."""
    import ray

    from curation.stages.base import StageContext
    from curation.stages.score import ScoreStage

    run_dir, _ = scored_run
    config = load_config(data={"name": "t", "stages": ["crawl", "score"]})
    plans = []
    original = ScoreStage._plan

    def plan_of(self, cfg, media):
        plans.append(original(self, cfg, media))
        return plans[-1]

    monkeypatch.setattr(ScoreStage, "_plan", plan_of)
    for resources, on_gpu in (({"CPU": 16.0, "GPU": 1.0}, True), ({"CPU": 2.0}, False)):
        monkeypatch.setattr(ray, "cluster_resources", lambda r=resources: dict(r))
        stage = ScoreStage(StageContext(run_dir, config))
        ds = stage.dataset(config.score, stage.kept_records(columns=["modality"]))
        decode_plan, _ = plans[-1]
        assert decode_plan.audio is not None and decode_plan.audio_waves is on_gpu
        assert decode_plan.pixels_as_decoded is on_gpu
        assert ("add_clip_tokens" in str(ds)) is on_gpu and "ClapSimilarityScorer" in str(ds)
    # a GPU-bound pipeline keeps the resizes in the tasks
    config = load_config(data={"name": "t", "stages": ["crawl", "score"], "score": {"resize_on_gpu": False}})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 1.0})
    stage = ScoreStage(StageContext(run_dir, config))
    stage.dataset(config.score, stage.kept_records(columns=["modality"]))
    assert plans[-1][0].audio_waves and not plans[-1][0].pixels_as_decoded


@pytest.mark.slow
def test_every_scored_record_has_its_signals(scored_run):
    run_dir, state = scored_run
    ledger = pq.read_table(run_dir / "ledger.parquet")
    assert state["counts"]["input"] == ledger.num_rows == state["counts"]["kept"] + state["counts"]["rejected"]
    for name in ("clip_score", "perplexity", "lang", "lang_score", "text_words", "text_alpha_words_ratio"):
        assert name in ledger.column_names
    scored = [r for r in ledger.to_pylist() if r["stage"] not in ("input", "crawl")]
    assert len(scored) == state["stages"]["score"]["summary"]["input"] > 400
    for r in scored:
        assert -1.0 <= r["clip_score"] <= 1.0 and r["perplexity"] > 1 and 0 < r["lang_score"] <= 1, r
        assert isinstance(r["lang"], str) and r["text_words"] >= 1
    summary = state["stages"]["score"]["summary"]
    assert summary["rejected"] == 0  # the score stage filters nothing: every crawled sample decodes


@pytest.mark.slow
def test_embeddings_for_dedup_are_l2_normalised_per_record(scored_run):
    run_dir, _ = scored_run
    files = sorted((run_dir / "score" / "embeddings").glob("*.parquet"))
    assert [f.stem for f in files] == sorted(p.stem for p in (run_dir / "crawl" / "shards").glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.schema.field("uid").type == pa.string() and table.schema.field("modality").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    kept = {r["uid"] for r in pq.read_table(run_dir / "ledger.parquet").to_pylist() if r["stage"] != "crawl"
            and r["stage"] != "input"}  # fmt: skip
    assert set(table.column("uid").to_pylist()) == kept and len(kept) == table.num_rows
    from curation.schemas import validate

    for row in table.slice(0, 20).to_pylist():
        validate("embedding", row)
    for modality in ("image", "video", "audio"):
        rows = table.filter(pa.compute.equal(table.column("modality"), modality))
        x = np.array(rows.column("embedding").to_pylist(), dtype=np.float32)
        assert x.ndim == 2 and len(x) > 10
        assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_resume_recomputes_only_missing_shards_identically(scored_run, tmp_path):
    from curation.runner import Run

    run_dir = tmp_path / "run"
    shutil.copytree(scored_run[0], run_dir)
    shard = sorted((run_dir / "score" / "done").glob("*.json"))[0].stem
    before = pq.read_table(run_dir / "score" / "ledger" / f"{shard}.parquet")
    before_emb = pq.read_table(run_dir / "score" / "embeddings" / f"{shard}.parquet")
    others = {p.name: p.stat().st_mtime_ns for p in (run_dir / "score" / "ledger").glob("*.parquet")}
    # as a killed run leaves it: one shard unfinished, the stage not complete
    for p in (run_dir / "score" / "done" / f"{shard}.json", run_dir / "score" / "_SUCCESS.json",
              run_dir / "filter" / "_SUCCESS.json"):  # fmt: skip
        p.unlink()
    shutil.rmtree(run_dir / "filter")
    config = load_config(data=json.loads((run_dir / "run.json").read_text())["config"])
    state = Run(config, run_dir).run()
    assert state["status"] == "complete"
    assert pq.read_table(run_dir / "score" / "ledger" / f"{shard}.parquet").equals(before)
    assert pq.read_table(run_dir / "score" / "embeddings" / f"{shard}.parquet").equals(before_emb)
    for p in (run_dir / "score" / "ledger").glob("*.parquet"):
        if p.stem != shard:
            assert p.stat().st_mtime_ns == others[p.name]  # finished shards were not redone


@pytest.mark.slow
def test_media_that_no_longer_decodes_is_rejected_not_dropped(scored_run, tmp_path):
    """A record the crawl accepted but whose bytes fail to decode at scoring is rejected as ``undecodable``."""
    from curation.runner import Run

    run_dir = tmp_path / "run"
    shutil.copytree(scored_run[0], run_dir)
    shard = sorted((run_dir / "crawl" / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        victim = next(m for m in tf if m.name.endswith((".png", ".jpg", ".webp")))
        uid = victim.name.partition(".")[0]
    with open(shard, "r+b") as f:  # overwrite the image bytes in place, keeping the tar valid
        f.seek(victim.offset_data)
        f.write(bytes(victim.size))
    shutil.rmtree(run_dir / "score")
    shutil.rmtree(run_dir / "filter")
    config = load_config(data=json.loads((run_dir / "run.json").read_text())["config"])
    state = Run(config, run_dir).run()
    row = next(r for r in pq.read_table(run_dir / "ledger.parquet").to_pylist() if r["uid"] == uid)
    assert (row["status"], row["stage"], row["reason"]) == ("rejected", "score", "undecodable")
    assert row["detail"].startswith("image:")
    assert state["stages"]["score"]["summary"]["reasons"] == {"undecodable": 1}
    assert state["counts"]["input"] == state["counts"]["kept"] + state["counts"]["rejected"]


@pytest.mark.slow
def test_scorers_match_their_bare_models(bootstrap_models, sample_dir, labels):
    """A scorer's batch path (decode task -> actor) gives the same numbers as the model called directly."""
    import torch

    from curation.scoring.clip_similarity import ClipSimilarityScorer
    from curation.scoring.decode import DecodePlan, decode_one

    scorer = ClipSimilarityScorer(ScoreConfig.Model())
    plan = DecodePlan(image=scorer.model.visual.preprocess_cfg)
    rows = [r for r in labels if r["modality"] == "image" and r["path"].startswith("media/")][:8]
    arrays = [decode_one((sample_dir / r["path"]).read_bytes(), "image", plan) for r in rows]
    table = pa.table({
        "modality": ["image"] * len(rows), "caption": [r["caption"] for r in rows],
        "inputs": pa.array([a.tobytes() for a in arrays], pa.large_binary()),
        "input_shape": [list(a.shape) for a in arrays], "undecodable": pa.nulls(len(rows), pa.string()),
    })  # fmt: skip
    out = scorer(table)
    from curation.models.clip import load_clip
    from curation.scoring.decode import image_transform, open_image

    model, tokenizer, preprocess = load_clip(ScoreConfig.Model())
    transform = image_transform(preprocess)  # open_clip's own transform, in one piece
    x = torch.stack([transform(open_image((sample_dir / r["path"]).read_bytes(), 48)) for r in rows])
    with torch.no_grad():
        ref = (
            model.encode_image(x, normalize=True)
            * model.encode_text(tokenizer([r["caption"] for r in rows]), normalize=True)
        ).sum(-1)
    got = out.column("clip_score").to_pylist()
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got, ref.tolist()))
