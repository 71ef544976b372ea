"""Score-stage throughput per scorer against the bare model, and peak memory as the input grows 10x.

    .venv/bin/python benchmarks/score.py [--size tiny|base|both] [--images 1024] [--scale 10] [--json out.json]

For each scorer (image-text, video-text, audio-text, perplexity, language id, text quality) it runs the score
stage's own Ray Data pipeline (``ScoreStage.dataset``: index -> decode tasks -> actor pool) on a crawled run of one
modality, and, in the same process and run, the bare model forward on pre-decoded tensors at the same batch size
with the same torch thread count as the actor (one), over the same records (captions sorted by length for the
language model, as its actor batches them). It prints records/s of both and their ratio (target >= 0.8).

Pipeline records/s is steady state, by difference: the crawl's default shard size (1,000 records), and runs over
N and 4N copies of the same shards. Both start the same workers and actors and load the same models, so
(extra records) / (extra time) is the per-record rate with those fixed costs cancelled (reported apart as
"start s"), while every per-shard cost (a task, a tar index, a parquet read) stays in, as in a real run. The
scorers run with the stage's default CPU reservations. That holds while the start costs the same in both runs, so
each run waits until its model actors are up before its first task (Ray Data's ``wait_for_min_actors_s``; the
stage itself does not wait). Without that, decode tasks ran while the actors imported torch and loaded their
models, slowing that start by as much as they competed for the cores: more in the larger run, which the
difference then counted as scoring time (on the H100 machine the actors took 20 to 40 s to start; on the 2-core
machine the tiny image-text ratio read 0.28 that way, 0.32-0.35 with the wait). The larger run also reports its
records/s from its first scored batch to its end ("after start"; "-" where the rest came too soon after that
batch to time).

This machine's speed drifts by up to 1.7x between minutes, so each ratio is taken from references (the bare rate
over at least a second of passes over the records, and the decode rate) measured right before its own pair of
pipeline runs; with the tiny models three such measurements are made per scorer, and the figures printed are their
medians, with the range of the ratios.

Decoding runs on the same two cores as the model, so when decoding a record costs more than its forward, no
pipeline reaches the bare rate. The "bound" column is the best any schedule can do here: the bare rate, or, when
lower, the cores divided by the CPU time of one record (its decode, timed in this process, plus its forward). The
tiny bootstrap models are decode-bound in this sense; the base-size ones are not.

``--size base`` uses architecture-sized models with random weights saved to local files (open_clip ViT-B-32,
transformers' default ClapConfig and GPT-2 124M), where the model, not decoding, dominates as with real models;
``tiny`` uses the embedded bootstrap models, whose forward is so cheap that decoding bounds the pipeline on CPU.
``--clip ViT-L-14`` sizes the base CLIP up to the architecture DataComp's filtering uses; on a GPU a ViT-B-32
forward is so fast that the actor's own work (resizing, copying) shows beside it.

With a GPU (``--device cuda``, the default where one is present) the models run on it in fp16 as the stage runs
them, the bare forward's inputs already on the GPU, Ray gets every core for decoding, and every batch is
``GPU_BATCH`` times the CPU one. As in the stage, the decode tasks then send images and frames unresized and the
CLIP actor resizes them on the GPU; the rate of that resize alone is printed too.

Memory: the whole score stage (all scorers, tiny models) on N records and on 10N, with the peak memory of the driver
and every Ray process (sampled every 0.2 s) for both; flat means the 10N peak stays near the N peak. The figure is
summed PSS, which counts a page shared by several processes (Ray's object store, shared libraries) once; summed RSS,
printed beside it, counts it in every process that maps it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARD_SIZE = 1000  # the crawl's default
GROWTH = 4  # throughput: a run over 4N shard copies minus one over N
# seconds of bare-model work in the larger timed run: the text scorers run near the bare rate, so their runs are
# short next to the pipeline's start (about 10 s, which varies by a second or two): they get more work
WORK_S = {"tiny": 6.0, "tiny-text": 20.0, "base": 30.0, "gpu": 20.0}
CORES = 2  # the cluster's CPUs: 2 on CPU machines (the target machine), every core with a GPU
GPU_BATCH = 4  # with a GPU every scorer's batch is this many times its CPU batch (as a GPU user would set it)
REPEATS = {"tiny": 3, "base": 1}  # (references, pipeline pair) measurements per scorer; the figures are medians
ACTOR_START_S = 600  # how long a pipeline run waits for its model actors to start before any task runs
AFTER_START_BATCHES, AFTER_START_S = 4, 1.0  # "after start" needs this many later batches over this long


# -- inputs ---------------------------------------------------------------------------------------------------------


def clean_media(sample: Path, out: Path, modalities: tuple[str, ...], copies: int = 1, limit: int | None = None):
    """A media folder of the sample's clean items of ``modalities`` (the first ``limit`` of each), hard-linked
    ``copies`` times."""
    from curation.sample import media_folder

    taken: dict[str, int] = {}

    def keep(row: dict) -> bool:
        if row["modality"] not in modalities or row["defect"] is not None:
            return False
        taken[row["modality"]] = taken.get(row["modality"], 0) + 1
        return limit is None or taken[row["modality"]] <= limit

    return media_folder(sample, out, keep, copies=copies, link=True)


def crawled_run(folder: Path, run_dir: Path, shard_size: int = 128):
    """Crawl a media folder (local files, no network) and return the run's config."""
    from curation.config import load_config
    from curation.runner import Run

    config = load_config(data={"name": "bench-score", "stages": ["crawl"], "input": {"path": str(folder)},
                               "crawl": {"shard_size": shard_size, "num_cpus": 0.5}})  # fmt: skip
    Run(config, run_dir).run()
    return config


# -- bare forward ---------------------------------------------------------------------------------------------------


def bare_rate(fn, records: int, min_seconds: float = 1.0, min_calls: int = 1) -> float:
    """Records/s of ``fn()`` (one pass over ``records`` records) over at least ``min_calls`` calls and
    ``min_seconds``, after a warm-up call: a window long enough that one busy moment does not decide the figure."""
    fn()
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_seconds:
        fn()
        calls += 1
    return calls * records / (time.perf_counter() - started)


def bare_forward(
    scorer: str, spec, rows: list[dict[str, Any]], run_dir: Path, video_frames: int, n: int, gpu: bool = False
):
    """A function running the bare model over every record of ``rows``, pre-decoded (and pre-tokenized), in
    batches of ``n`` as the stage makes them: the same records the pipeline scores, so
    neither side gains from a lucky batch (short captions, a warm cache from repeating one batch). With ``gpu``
    the model runs where and as the stage's actor runs it (the GPU, fp16), its inputs already on the GPU."""
    import torch

    from curation.scoring.base import resolve_device
    from curation.scoring.decode import DecodePlan, ImagePreprocessor, decode_one

    if not gpu:
        torch.set_num_threads(1)  # as the actor: one thread per reserved CPU (the pools reserve fractions)
    device, precision = resolve_device(spec, gpu)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    captions = [r["caption"] for r in rows]
    data = [_media_bytes(run_dir, r) for r in rows] if scorer.endswith("_text") else []
    cut = [slice(i, i + n) for i in range(0, len(rows), n)]
    if scorer in ("image_text", "video_text"):
        from curation.models.clip import input_dtype, load_clip

        model, tokenizer, cfg = load_clip(spec, device, precision)
        dtype = input_dtype(precision)
        plan = DecodePlan(image=cfg, video=cfg, video_frames=video_frames)
        arrays = [decode_one(b, r["modality"], plan, r.get("num_frames")) for b, r in zip(data, rows)]
        frames = [np.concatenate([a[None] if a.ndim == 3 else a for a in arrays[c]]) for c in cut]
        batches = [(ImagePreprocessor.to_tensor(f, cfg["mean"], cfg["std"], device, dtype),
                    tokenizer(captions[c]).to(device)) for f, c in zip(frames, cut)]  # fmt: skip

        def run():
            with torch.inference_mode():
                for x, tokens in batches:
                    model.encode_image(x)
                    model.encode_text(tokens)
            sync()

        return run
    if scorer == "audio_text":
        from curation.models.hf import load_clap
        from curation.scoring.decode import AudioFeatures

        model, tokenizer, fe = load_clap(spec, device, precision)
        dtype = next(model.parameters()).dtype
        features = AudioFeatures.of(fe)
        mels = [decode_one(b, "audio", DecodePlan(audio=features)) for b in data]
        batches = [(features.model_inputs(mels[c], device, dtype),
                    tokenizer(captions[c], padding=True, return_tensors="pt").to(device)) for c in cut]  # fmt: skip

        def run():
            with torch.inference_mode():
                for features, enc in batches:
                    model.get_audio_features(input_features=features)
                    model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            sync()

        return run
    if scorer == "perplexity":
        from curation.scoring.perplexity import PerplexityScorer, flat_ids, padded

        ppl = PerplexityScorer(spec, has_gpu=gpu)
        # the actor's batches: captions of similar token counts, little padding
        values, offsets = flat_ids(sorted(ppl.encode(captions), key=len))
        starts, lengths = offsets[:-1], np.diff(offsets)
        batches = [tuple(torch.from_numpy(a).to(device) for a in padded(values, starts[c], lengths[c], ppl.pad))
                   for c in cut]  # fmt: skip

        def run():
            with torch.inference_mode():
                for input_ids, mask in batches:
                    ppl.model(input_ids=input_ids, attention_mask=mask)
            sync()

        return run
    if scorer == "language":
        import pyarrow as pa

        from curation.scoring.language import LanguageIdScorer, fasttext_lines

        lid = LanguageIdScorer(spec)
        lines = fasttext_lines(pa.array(captions, pa.string())).drop_null().to_pylist()  # made beforehand

        def run():
            for c in cut:
                lid.predict_lines(lines[c])  # the C++ batch call alone

        return run
    from curation.scoring.text_quality import text_stats

    return lambda: [text_stats(c) for c in captions]


def _media_bytes(run_dir: Path, row: dict[str, Any]) -> bytes:
    from curation.fsutil import tar_index

    tar = run_dir / "crawl" / "shards" / f"{row['shard']}.tar"
    if tar not in _MEDIA_OFFSETS:
        _MEDIA_OFFSETS[tar] = {name.partition(".")[0]: where for name, where in tar_index(tar).items()
                               if not name.endswith((".txt", ".json"))}  # fmt: skip
    offset, size = _MEDIA_OFFSETS[tar][row["uid"]]
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


_MEDIA_OFFSETS: dict[Path, dict[str, tuple[int, int]]] = {}  # crawl tar -> uid -> (offset, size) of its media


# -- pipeline ---------------------------------------------------------------------------------------------------------


def replicated_run(run_dir: Path, copies: int) -> Path:
    """A view of a crawled run with every crawl shard linked ``copies`` times (the same records under new shard
    names): as much scoring work as a crawl ``copies`` times larger, without crawling it."""
    view = run_dir.with_name(f"{run_dir.name}-x{copies}")
    if view.exists():
        shutil.rmtree(view)
    (view / "crawl" / "shards").mkdir(parents=True)
    shutil.copy(run_dir / "ledger.parquet", view / "ledger.parquet")
    for parquet in sorted((run_dir / "crawl" / "shards").glob("*.parquet")):
        for c in range(copies):
            for ext in (".parquet", ".tar"):
                (view / "crawl" / "shards" / f"{parquet.stem}-{c:04d}{ext}").symlink_to(parquet.with_suffix(ext))
    return view


def run_pipeline(config, run_dir: Path) -> tuple[int, float, float | None]:
    """(records, seconds, records/s after the first scored batch) of the score stage's dataset over every crawl
    shard of ``run_dir``; the last is ``None`` when the rest came too soon after the first batch to time."""
    from curation.stages.base import StageContext
    from curation.stages.score import ScoreStage

    stage = ScoreStage(StageContext(run_dir.resolve(), config))
    records = stage.kept_records()
    total = sum(t.num_rows for t in records.values())
    started = time.perf_counter()
    ds = stage.dataset(config.score, records)
    ds.context.wait_for_min_actors_s = ACTOR_START_S  # every model actor is up before the first task runs
    batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
    n, first, later = 0, None, 0
    for b in batches:
        n += b.num_rows
        if first is None:
            first = (n, time.perf_counter())
        else:
            later += 1
    assert n == total, (n, total)
    end = time.perf_counter()
    # a rate only when the scored records kept arriving after the first batch: in a short run an actor's output
    # can come all at once, and (rest) / (milliseconds) is no rate (a base-size video run read 3,245 records/s)
    spread = first is not None and later >= AFTER_START_BATCHES and end - first[1] >= AFTER_START_S
    return n, end - started, (n - first[0]) / (end - first[1]) if spread else None


def pipeline_rate(config, small: Path, large: Path) -> dict[str, float]:
    """Steady-state records/s of the pipeline, by difference: a run over the ``large`` shard copies minus a run over
    the ``small`` ones. Both start the same workers and actors and load the same models, so those costs cancel; the
    per-shard and per-record costs of the extra shards remain."""
    n_small, t_small, _ = run_pipeline(config, small)
    n_all, t_all, after_start = run_pipeline(config, large)
    per_record = (t_all - t_small) / (n_all - n_small)
    return {"records": n_all, "steady": 1 / per_record if per_record > 0 else float("nan"),
            "end_to_end": n_all / t_all, "start_s": t_small - n_small * per_record,
            "after_start": after_start}  # fmt: skip


def decode_rate(
    scorer: str, spec, rows: list[dict[str, Any]], run_dir: Path, video_frames: int, gpu: bool
) -> float | None:
    """Records/s of decoding alone (the decode tasks' work, one core, in this process); ``None`` for text. With a
    GPU the tasks leave the CLAP log-mels and the images' resizes to the actor, as the stage does."""
    from curation.scoring.decode import DecodePlan, decode_one, keep_freed_memory

    if not scorer.endswith("_text"):
        return None
    keep_freed_memory()  # as every decode task does (this process's model forwards showed no change with it)
    if scorer == "audio_text":
        from curation.models.hf import load_clap_feature_extractor
        from curation.scoring.decode import AudioFeatures

        plan = DecodePlan(audio=AudioFeatures.of(load_clap_feature_extractor(spec)), audio_waves=gpu)
    else:
        from curation.models.clip import clip_preprocess_cfg, resolve_clip

        cfg = clip_preprocess_cfg(resolve_clip(spec))
        plan = DecodePlan(image=cfg, video=cfg, video_frames=video_frames, pixels_as_decoded=gpu)
    rows = rows[:: max(1, len(rows) // 256)]  # spread over the run: clip lengths and formats vary
    data = [_media_bytes(run_dir, r) for r in rows]
    decode_one(data[0], rows[0]["modality"], plan, rows[0].get("num_frames"))  # warm-up: imports, first open
    started = time.perf_counter()
    for b, r in zip(data, rows):
        decode_one(b, r["modality"], plan, r.get("num_frames"))
    return len(rows) / (time.perf_counter() - started)


def resize_rate(scorer: str, spec, rows: list[dict[str, Any]], run_dir: Path, video_frames: int, n: int,
                device: str = "cuda") -> dict[str, Any] | None:  # fmt: skip
    """Records/s of the CLIP actor's resize on ``device`` of images and frames sent at their decoded size (what a
    GPU stage adds to the actor's GPU work), in batches of ``n``: with products in float32 halves where exact
    (``float32``), and with every product in float64 (``float64``); ``actor`` names the one the actor takes on
    this device. ``None`` for the other scorers. Each record is copied to the device on its own, where the actor
    copies a batch's adjacent rows at once."""
    if scorer not in ("image_text", "video_text"):
        return None
    import torch

    from curation.models.clip import clip_preprocess_cfg, resolve_clip
    from curation.scoring import resample
    from curation.scoring.decode import DecodePlan, ImagePreprocessor, decode_one

    cfg = clip_preprocess_cfg(resolve_clip(spec))
    pre = ImagePreprocessor(cfg)
    plan = DecodePlan(image=cfg, video=cfg, video_frames=video_frames, pixels_as_decoded=True)
    arrays = [decode_one(_media_bytes(run_dir, r), r["modality"], plan, r.get("num_frames")) for r in rows]
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def run():
        for i in range(0, len(arrays), n):
            pre.resized(arrays[i : i + n], device)
        sync()

    kept = resample.FLOAT32_DEVICES, resample.FAST_FLOAT64_GPUS
    modes = {"float32": ((device,), frozenset()), "float64": ((), kept[1])}
    try:
        for devices, fast in modes.values():  # each mode's kernels loaded before either is timed
            resample.FLOAT32_DEVICES, resample.FAST_FLOAT64_GPUS = devices, fast
            run()
        rates: dict[str, Any] = {}
        for name, (devices, fast) in modes.items():
            resample.FLOAT32_DEVICES, resample.FAST_FLOAT64_GPUS = devices, fast
            rates[name] = bare_rate(run, len(rows))
    finally:
        resample.FLOAT32_DEVICES, resample.FAST_FLOAT64_GPUS = kept
    bands = torch.zeros((1, 1, 1, 2), device=device)  # the actor's choice here
    rates["actor"] = "float32" if resample._float32_exact(bands) else "float64"
    return rates


def score_config(base, scorer: str, spec_overrides: dict[str, Any], batch: int, sets: list[str] | None = None):
    """The config of one scorer's runs: only that scorer, its batch size and model, then ``sets`` (``--set``)."""
    from curation.config import load_config

    data = base.to_dict()
    data["stages"] = ["crawl", "score"]
    data["score"]["scorers"] = [scorer]
    key = {"image_text": "image_text", "video_text": "image_text", "audio_text": "audio_text"}.get(scorer, scorer)
    if key in data["score"]:
        data["score"][key].update({"batch_size": batch, **spec_overrides.get(key, {})})
    return load_config(data=data, overrides=sets)


# -- base-size models with random weights, saved as a user's downloads would be -------------------------------------


def clip_checkpoint(folder: Path, clip: str = "ViT-B-32") -> Path:
    """An open_clip ``clip`` architecture with random weights (seed 0), saved to a safetensors file in ``folder``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model(clip)
    path = folder / f"{clip}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def base_models(folder: Path, clip: str = "ViT-B-32") -> dict[str, dict[str, Any]]:
    from transformers import AutoTokenizer, ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel

    from curation.models.bootstrap import build_tokenizer, model_path

    clip_path = clip_checkpoint(folder, clip)
    tok = build_tokenizer(["a red circle in the top left", "two short beeps"] * 50, vocab_size=512)
    clap_dir = folder / "clap-base"
    ClapModel(ClapConfig(text_config={"vocab_size": len(tok)})).save_pretrained(clap_dir)
    tok.save_pretrained(clap_dir)
    # LAION-CLAP's input size (10 s, 64 mel bins, 1001 frames), at 16 kHz
    ClapFeatureExtractor(feature_size=64, sampling_rate=16000, hop_length=160, max_length_s=10, fft_window_size=400,
                         frequency_min=50, frequency_max=8000, padding="pad", truncation="rand_trunc",
                         ).save_pretrained(clap_dir)  # fmt: skip
    lm_dir = folder / "gpt2-base"
    lm_tok = AutoTokenizer.from_pretrained(model_path("lm"))
    config = GPT2Config(vocab_size=len(lm_tok), bos_token_id=lm_tok.bos_token_id, eos_token_id=lm_tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(lm_dir)
    lm_tok.save_pretrained(lm_dir)
    return {
        "image_text": {"name": clip, "path": str(clip_path)},
        "audio_text": {"path": str(clap_dir)},
        "perplexity": {"path": str(lm_dir)},
    }


# -- memory -------------------------------------------------------------------------------------------------------------


class PeakMemory:
    """Peak memory of this process and all its descendants (the local Ray instance: GCS, raylet, workers), summed
    two ways: PSS (each shared page split among the processes that map it) and RSS (each counted in full by every
    process that maps it). Ray's object store is one shared memory region that the workers map, so summed RSS counts
    the blocks they read several times over; PSS counts each page once."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak = self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> tuple[int, int]:
        """(summed PSS, summed RSS) in bytes now."""
        import psutil

        pss = rss = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                info = p.memory_full_info()
            except psutil.Error:
                continue
            pss, rss = pss + info.pss, rss + info.rss
        return pss, rss

    def _run(self) -> None:
        while not self._stop.is_set():
            pss, rss = self.current()
            self.peak, self.peak_rss = max(self.peak, pss), max(self.peak_rss, rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.baseline = self.current()[0]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def memory_run(sample: Path, tmp: Path, copies: int) -> dict[str, float]:
    from curation.config import load_config
    from curation.runner import Run

    folder = clean_media(sample, tmp / f"media-x{copies}", ("image", "video", "audio"), copies)
    config = crawled_run(folder, tmp / f"run-x{copies}", shard_size=100)
    data = config.to_dict() | {"stages": ["crawl", "score"]}
    config = load_config(data=data)
    with PeakMemory() as mem:
        t = time.perf_counter()
        state = Run(config, tmp / f"run-x{copies}").run()
        seconds = time.perf_counter() - t
    n = state["stages"]["score"]["summary"]["input"]
    return {"records": n, "seconds": round(seconds, 1), "peak_mib": round(mem.peak / 2**20),
            "peak_rss_mib": round(mem.peak_rss / 2**20), "idle_mib": round(mem.baseline / 2**20)}  # fmt: skip


# -- main -------------------------------------------------------------------------------------------------------------


def throughput(size: str, sample: Path, tmp: Path, n_img: int, only: list[str] | None = None,
               gpu: bool = False, repeats: int | None = None, clip: str = "ViT-B-32",
               sets: list[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """One row per scorer: pipeline and bare records/s on single-modality crawled runs."""
    from curation.stages.base import StageContext
    from curation.stages.score import ScoreStage

    # base-size models take seconds a batch on one core: fewer records, still several batches each
    counts = {"image": n_img, "video": n_img // 8, "audio": n_img // 2}
    if size == "base" and not gpu:
        counts = {"image": 192, "video": 24, "audio": 48}
    runs = {}
    for modality, limit in counts.items():
        folder = clean_media(sample, tmp / f"{size}-media-{modality}", (modality,), limit=limit)
        run_dir = tmp / f"{size}-run-{modality}"
        runs[modality] = (crawled_run(folder, run_dir, shard_size=SHARD_SIZE), run_dir)
    overrides = base_models(tmp, clip) if size == "base" else {}
    plan = [("image_text", "image", 64), ("video_text", "video", 8), ("audio_text", "audio", 16),
            ("perplexity", "image", 128), ("language", "image", 512), ("text_quality", "image", 256)]  # fmt: skip
    if size == "base":  # no model behind language id and text quality: nothing to size up
        plan = plan[:4]
    plan = [(s, m, b * GPU_BATCH if gpu else b) for s, m, b in plan if only is None or s in only]
    out = []
    for scorer, modality, batch in plan:
        config, run_dir = runs[modality]
        config = score_config(config, scorer, overrides, batch, sets)
        key = {"video_text": "image_text", "text_quality": "language"}.get(scorer, scorer)
        spec = getattr(config.score, key)
        rows = [r for t in ScoreStage(StageContext(run_dir.resolve(), config)).kept_records().values()
                for r in t.to_pylist()]  # fmt: skip
        bs = spec.batch_size if scorer != "text_quality" else 256
        forward = bare_forward(scorer, spec, rows, run_dir, config.score.video_frames, bs, gpu)
        work = WORK_S["gpu" if gpu else size if size == "base" or scorer.endswith("_text") else "tiny-text"]
        # enough copies for about WORK_S seconds of bare model work in the larger run
        copies = max(1, math.ceil(bare_rate(forward, len(rows)) * work / (GROWTH * len(rows))))
        small, large = replicated_run(run_dir, copies), replicated_run(run_dir, GROWTH * copies)
        run_pipeline(config, small)  # warm-up: Ray keeps the worker processes (and their imports) for the timed runs
        pairs = []
        for _ in range(repeats or REPEATS[size]):  # each ratio from references taken right before its pipeline runs
            bare = bare_rate(forward, len(rows))
            decode = decode_rate(scorer, spec, rows, run_dir, config.score.video_frames, gpu)
            # the decode tasks' share of the work under a GPU stage's plan, which leaves more of it to the actors
            gpu_plan = decode if gpu else decode_rate(scorer, spec, rows, run_dir, config.score.video_frames, True)
            pipe = pipeline_rate(config, small, large)
            # the cores over one record's CPU work: its decode, and its forward unless that runs on the GPU
            bound = bare if decode is None else min(bare, CORES / (1 / decode + (0 if gpu else 1 / bare)))
            pairs.append({**pipe, "bare": bare, "decode": decode, "decode_gpu_plan": gpu_plan, "bound": bound,
                          "ratio": pipe["steady"] / bare, "of_bound": pipe["steady"] / bound})  # fmt: skip
        ratios = sorted(p["ratio"] for p in pairs)
        resize = resize_rate(scorer, spec, rows, run_dir, config.score.video_frames, bs) if gpu else None
        row = {"size": size, "device": "cuda" if gpu else "cpu", "scorer": scorer, "batch": bs,
               "model": Path(spec.path).name if spec.path and spec.name == "bootstrap" else spec.name,
               "records": pairs[0]["records"], "pairs": len(pairs),
               "pipeline_rps": _median(pairs, "steady"), "end_to_end_rps": _median(pairs, "end_to_end"),
               "start_s": _median(pairs, "start_s"), "after_start_rps": _median(pairs, "after_start"),
               "bare_rps": _median(pairs, "bare"),
               "decode_rps": _median(pairs, "decode"), "decode_gpu_plan_rps": _median(pairs, "decode_gpu_plan"),
               "bound_rps": _median(pairs, "bound"),
               "ratio": _median(pairs, "ratio", 2), "ratio_range": [round(ratios[0], 2), round(ratios[-1], 2)],
               "of_bound": _median(pairs, "of_bound", 2),
               "gpu_resize_rps": None if resize is None else {k: v if isinstance(v, str) else round(v, 1)
                                                              for k, v in resize.items()}}  # fmt: skip
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def _median(rows: list[dict[str, Any]], key: str, digits: int = 1) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return round(statistics.median(values), digits) if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "base", "both"], default="both")
    ap.add_argument("--images", type=int, default=1000, help="clean images in the throughput sample (tiny)")
    ap.add_argument("--scale", type=int, default=10, help="input growth for the memory check")
    ap.add_argument("--memory-records", type=int, default=240, help="clean images for the memory check's 1x")
    ap.add_argument("--scorers", nargs="+", default=None, help="only these scorers (default: all)")
    ap.add_argument("--clip", default="ViT-B-32",
                    help="open_clip architecture of the base-size CLIP (random weights), e.g. ViT-L-14")  # fmt: skip
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help=f"cuda: models on the GPU (fp16), Ray on every core, batches x{GPU_BATCH} (auto: cuda if "
                    "present)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"measurements per scorer (default: {REPEATS['tiny']} tiny, {REPEATS['base']} base)")  # fmt: skip
    ap.add_argument("--work-seconds", type=float, default=None,
                    help="seconds of bare-model work in each scorer's larger timed run (default: "
                    + ", ".join(f"{v:g} {k}" for k, v in WORK_S.items()) + "); less for a quick look")  # fmt: skip
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a config key in every timed pipeline and bare model (repeatable), e.g. "
                    "score.resize_on_gpu=false or score.image_text.concurrency=4")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    from curation.config import ConfigError, load_config

    try:  # a bad key fails here, not after the sample and the models are made
        load_config(overrides=args.set)
    except ConfigError as e:
        ap.error(str(e))
    if args.work_seconds is not None:
        if args.work_seconds <= 0:
            ap.error(f"--work-seconds: must be > 0, got {args.work_seconds}")
        WORK_S.update(dict.fromkeys(WORK_S, args.work_seconds))

    import logging

    import ray

    from curation.models.bootstrap import bootstrap

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-operator progress lines, when not on a tty
    import torch

    from curation.sample import generate_sample

    global CORES
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU on this machine")
    CORES = (os.cpu_count() or 2) if gpu else 2
    bootstrap()  # trained (or found) before the clock and before Ray
    ray.init(num_cpus=CORES, num_gpus=1 if gpu else 0, include_dashboard=False, logging_level="ERROR")
    print(f"device: {'GPU ' + torch.cuda.get_device_name() if gpu else 'CPU'}, {CORES} CPUs for Ray", flush=True)
    results: dict[str, Any] = {"throughput": [], "memory": [], "set": args.set}
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        sample = tmp / "sample"
        n_img = max(args.images, 192)
        generate_sample(sample, seed=7, n_image=n_img, n_video=n_img // 8, n_audio=n_img // 2, defect_rate=0.0)
        for size in ["tiny", "base"] if args.size == "both" else [args.size]:
            results["throughput"] += throughput(size, sample, tmp, n_img, args.scorers, gpu, args.repeats, args.clip,
                                                args.set)  # fmt: skip
        if not args.skip_memory:
            msample = tmp / "msample"
            n = args.memory_records
            generate_sample(msample, seed=8, n_image=n, n_video=n // 5, n_audio=n * 3 // 10, defect_rate=0.0)
            for copies in (1, args.scale):
                row = memory_run(msample, tmp, copies)
                results["memory"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _print_table(results: dict[str, Any]) -> None:
    print(
        "\nscorer throughput (records/s; pipeline = score stage's Ray Data pipeline, steady state;\n"
        "ratio = pipeline / bare, target >= 0.8; bound = bare, or the cores over one record's decode + forward;\n"
        "decode = one core's decode work; GPU plan = the same under a GPU stage's plan, which leaves more to the actors)"
    )
    if results.get("set"):
        print("with --set " + " ".join(results["set"]))
    print(f"{'size':<5} {'scorer':<13} {'model':<10} {'batch':>5} {'records':>8} {'pipeline':>9} {'bare':>9} {'ratio':>6} "
          f"{'range':>11} {'decode':>8} {'GPU plan':>8} {'bound':>9} {'of bound':>8} {'start s':>7} "
          f"{'after start':>11}")  # fmt: skip
    for r in results["throughput"]:
        spread = "{:.2f}-{:.2f}".format(*r["ratio_range"])
        print(f"{r['size']:<5} {r['scorer']:<13} {r['model'][:10]:<10} {r['batch']:>5} {r['records']:>8} {r['pipeline_rps']:>9} "
              f"{r['bare_rps']:>9} {r['ratio']:>6} {spread:>11} {r['decode_rps'] or '-':>8} "
              f"{r['decode_gpu_plan_rps'] or '-':>8} {r['bound_rps']:>9} {r['of_bound']:>8} {r['start_s']:>7} "
              f"{r['after_start_rps'] or '-':>11}")  # fmt: skip
    resized = [r for r in results["throughput"] if r.get("gpu_resize_rps")]
    if resized:
        print("GPU resize of images and frames sent at their decoded size (the CLIP actor's added GPU work), "
              "records/s, with float32 halves and in float64 (* the actor's on this GPU): "
              + ", ".join(f"{r['scorer']} " + " and ".join(
                  f"{r['gpu_resize_rps'][k]}{'*' if r['gpu_resize_rps']['actor'] == k else ''}"
                  for k in ("float32", "float64")) for r in resized))  # fmt: skip
    if results["memory"]:
        print(
            "\nscore stage, all scorers, peak memory of driver + Ray processes (PSS; summed RSS double-counts shared)"
        )
        for r in results["memory"]:
            print(f"  {r['records']:>6} records: peak {r['peak_mib']} MiB PSS, {r['peak_rss_mib']} MiB summed RSS "
                  f"(idle {r['idle_mib']} MiB PSS), {r['seconds']} s")  # fmt: skip
        a, b = results["memory"][0], results["memory"][-1]
        print(
            f"  {b['records'] / a['records']:.0f}x input -> {b['peak_mib'] / a['peak_mib']:.2f}x peak PSS, "
            f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x summed RSS"
        )


if __name__ == "__main__":
    sys.exit(main())
