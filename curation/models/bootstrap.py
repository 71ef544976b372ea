"""The embedded default models, trained here because nothing can be downloaded: a tiny image-text CLIP (open_clip
config ``curation-tiny-clip``), a tiny audio-text CLAP (transformers ``ClapModel``) and a tiny causal LM (GPT-2
architecture, with a byte-level BPE tokenizer built with ``tokenizers``).

They train deterministically, in a few minutes on 2 CPU cores, on the clean pairs of a generated sample with a
different seed (and more items) than the evaluation sample the tests use (seed 0), so the tests measure
generalisation, not memory. Each caption is augmented with paraphrases the sample's own captioner writes from the
item's attributes: with a closed vocabulary that is what lets such small models learn that "a red star, top left"
and "a picture of a red star in the top left corner" say the same.

Models are cached in :func:`curation.models.cache.cache_root` as ``<name>-v<version>/``, written atomically
under a lock so that two processes never train the same model at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from curation.models.cache import atomic_dir, cache_root, file_lock

log = logging.getLogger("curation")

BOOTSTRAP_VERSION = "3"
TRAIN_SEED = 1234  # the tests evaluate on seed 0: never train on it
KINDS = ("clip", "clap", "lm")
NAMES = {"clip": "tiny-clip", "clap": "tiny-clap", "lm": "tiny-lm"}
DESCRIPTIONS = {
    "clip": "image/video-text similarity (open_clip curation-tiny-clip)",
    "clap": "audio-text similarity (transformers ClapModel)",
    "lm": "caption perplexity (transformers GPT-2 architecture)",
}
# clean items per modality in the training sample, per model
SAMPLE_SIZES = {
    "clip": {"n_image": 1200, "n_video": 240, "n_audio": 0},
    "clap": {"n_image": 0, "n_video": 0, "n_audio": 1000},
    "lm": {"n_image": 300, "n_video": 60, "n_audio": 200},
}
PARAPHRASES = 6  # captions per training item: the sample's own plus paraphrases from its attributes
TRAIN_THREADS = 1  # fixed, so results do not depend on the core count; models train in parallel processes instead
METADATA = "metadata.json"


def model_path(kind: str) -> Path:
    return cache_root() / f"{NAMES[kind]}-v{BOOTSTRAP_VERSION}"


def is_ready(kind: str) -> bool:
    return (model_path(kind) / METADATA).is_file()


def ensure(kind: str, sample_dir: Path | None = None) -> Path:
    """The cached bootstrap model ``kind`` (``clip``, ``clap`` or ``lm``); trains it first if it is missing."""
    if kind not in KINDS:
        raise ValueError(f"unknown bootstrap model {kind!r}; known: {', '.join(KINDS)}")
    final = model_path(kind)
    if (final / METADATA).is_file():
        return final
    with file_lock(cache_root() / f".{final.name}.lock"):
        if (final / METADATA).is_file():  # another process trained it while we waited
            return final
        log.info("bootstrap: training %s (%s) into %s", NAMES[kind], DESCRIPTIONS[kind], final)
        with _training_sample(kind, sample_dir) as sample, atomic_dir(final) as tmp:
            started = time.time()
            with _deterministic_torch():
                info = TRAINERS[kind](sample, tmp)
            if not any(tmp.glob("*.safetensors")):  # e.g. save_pretrained on a torch.distributed rank other than 0
                raise RuntimeError(f"bootstrap: training {NAMES[kind]} wrote no weights into {tmp}")
            meta = {
                "name": NAMES[kind],
                "kind": kind,
                "version": BOOTSTRAP_VERSION,
                "description": DESCRIPTIONS[kind],
                "train_seed": TRAIN_SEED,
                "sample": json.loads((sample / "sample.json").read_text())["params"],
                "train_seconds": round(time.time() - started, 1),
                "created": time.time(),
                **_versions(),
                **info,
            }
            (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        log.info("bootstrap: %s ready in %.0f s", NAMES[kind], meta["train_seconds"])
    return final


def bootstrap(kinds: Iterable[str] = KINDS, force: bool = False) -> dict[str, Path]:
    """Train (or find cached) every bootstrap model in ``kinds``; ``force`` retrains. One training sample with all
    modalities serves all of them."""
    kinds = list(kinds)
    if force:
        for kind in kinds:
            with file_lock(cache_root() / f".{model_path(kind).name}.lock"):
                shutil.rmtree(model_path(kind), ignore_errors=True)
    missing = [k for k in kinds if not is_ready(k)]
    if not missing:
        return {k: model_path(k) for k in kinds}
    sizes = {m: max(SAMPLE_SIZES[k][m] for k in missing) for m in ("n_image", "n_video", "n_audio")}
    with tempfile.TemporaryDirectory(prefix="curation-bootstrap-") as tmp:
        sample = Path(tmp) / "sample"
        _generate(sample, sizes)
        workers = min(len(missing), os.cpu_count() or 1)
        if workers > 1:
            # one single-threaded process per model: on few cores this beats multi-threaded training by far
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for future in [pool.submit(ensure, k, sample) for k in missing]:
                    future.result()
        return {k: ensure(k, sample_dir=sample) for k in kinds}


def list_models() -> list[dict[str, Any]]:
    """The bootstrap models with their cache state (for ``curation models list``)."""
    out = []
    for kind in KINDS:
        path = model_path(kind)
        meta = json.loads((path / METADATA).read_text()) if is_ready(kind) else {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if meta else 0
        out.append({"kind": kind, "name": NAMES[kind], "version": BOOTSTRAP_VERSION, "path": str(path),
                    "cached": bool(meta), "bytes": size, "train_seconds": meta.get("train_seconds"),
                    "description": DESCRIPTIONS[kind]})  # fmt: skip
    return out


# -- training data ----------------------------------------------------------------------------------------------


def _generate(out: Path, sizes: dict[str, int]) -> None:
    from curation.sample import generate_sample

    # no defects: every caption is clean (the trainers still check labels.parquet)
    generate_sample(out, seed=TRAIN_SEED, defect_rate=0.0, **sizes)


@contextmanager
def _training_sample(kind: str, sample_dir: Path | None):
    if sample_dir is not None:
        yield Path(sample_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"curation-bootstrap-{kind}-") as tmp:
        _generate(Path(tmp) / "sample", SAMPLE_SIZES[kind])
        yield Path(tmp) / "sample"


def _clean_items(sample: Path, modality: str) -> list[dict[str, Any]]:
    """Labelled rows of ``modality`` whose media and caption are both clean."""
    import pyarrow.parquet as pq

    rows = pq.read_table(sample / "labels.parquet").to_pylist()
    return [
        r for r in rows
        if r["modality"] == modality and r["defect"] is None and r["clean_caption_ok"] and r["path"].startswith("media/")
    ]  # fmt: skip


def _captions(item: dict[str, Any], rng: np.random.Generator) -> list[str]:
    """The item's caption plus paraphrases the sample's captioner writes from its attributes."""
    from curation.sample.generate import CAPTIONERS

    attrs = json.loads(item["attrs"])
    return [item["caption"]] + [CAPTIONERS[item["modality"]](attrs, rng) for _ in range(PARAPHRASES - 1)]


@contextmanager
def _deterministic_torch():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    torch.manual_seed(TRAIN_SEED)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _versions() -> dict[str, str]:
    from importlib import metadata

    from curation.sample.generate import GENERATOR_VERSION

    out = {"generator_version": GENERATOR_VERSION}
    for pkg in ("torch", "open_clip_torch", "transformers", "tokenizers"):
        try:
            out[f"{pkg}_version"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _contrastive_loss(a, b, logit_scale):
    import torch
    import torch.nn.functional as F

    logits = logit_scale.exp().clamp(max=100) * a @ b.T
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _schedule(optimizer, steps: int):
    import torch

    lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)


# -- tiny CLIP ----------------------------------------------------------------------------------------------------

CLIP_STEPS = 400
CLIP_TRAIN_FRAMES = 4
CLIP_PREPROCESS = {"resize_mode": "squash"}  # keep the whole frame: a shape "in the top left" must stay in view


def train_clip(sample: Path, out: Path) -> dict[str, Any]:
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from curation.models.clip import (
        CHECKPOINT,
        FOLDER_CONFIG,
        TINY_CLIP,
        ClipSource,
        clip_preprocess_cfg,
        register_model_configs,
    )
    from curation.scoring.decode import ImagePreprocessor, open_image, sample_video_frames

    register_model_configs()
    preprocess_cfg = clip_preprocess_cfg(ClipSource(TINY_CLIP, None, CLIP_PREPROCESS))
    pre = ImagePreprocessor(preprocess_cfg)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    rng = np.random.default_rng(TRAIN_SEED)

    images = _clean_items(sample, "image")
    videos = _clean_items(sample, "video")
    img_px = np.stack([pre.pixels(open_image((sample / r["path"]).read_bytes(), pre.size)) for r in images])
    vid_px = np.stack(
        [
            np.stack([pre.pixels(f) for f in sample_video_frames((sample / r["path"]).read_bytes(), CLIP_TRAIN_FRAMES)])
            for r in videos
        ]
    )
    img_x = pre.to_tensor(img_px, pre.mean, pre.std)
    vid_x = pre.to_tensor(vid_px.reshape(-1, *vid_px.shape[2:]), pre.mean, pre.std).view(
        len(videos), CLIP_TRAIN_FRAMES, 3, pre.size, pre.size
    )
    img_t = torch.stack([tokenizer(_captions(r, rng)) for r in images])  # (N, K, ctx)
    vid_t = torch.stack([tokenizer(_captions(r, rng)) for r in videos])

    with _quiet_root_logger():  # open_clip warns (on the root logger) that the model is randomly initialised
        model = open_clip.create_model(TINY_CLIP)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    scheduler = _schedule(optimizer, CLIP_STEPS)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    n_img, n_vid = 128, 32
    loss = torch.tensor(0.0)
    for _ in range(CLIP_STEPS):
        i = torch.randint(len(images), (n_img,), generator=g)
        j = torch.randint(len(videos), (n_vid,), generator=g)
        feats = model.encode_image(torch.cat([img_x[i], vid_x[j].flatten(0, 1)]))
        img_f = F.normalize(feats[:n_img], dim=-1)
        # a video is the mean of its normalised frame embeddings, exactly as the scorer pools it
        vid_f = F.normalize(F.normalize(feats[n_img:], dim=-1).view(n_vid, CLIP_TRAIN_FRAMES, -1).mean(1), dim=-1)
        k = torch.randint(PARAPHRASES, (n_img + n_vid,), generator=g)
        tokens = torch.cat([img_t[i], vid_t[j]])[torch.arange(n_img + n_vid), k]
        loss = _contrastive_loss(
            torch.cat([img_f, vid_f]), model.encode_text(tokens, normalize=True), model.logit_scale
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CHECKPOINT))
    model_cfg = open_clip.get_model_config(TINY_CLIP)
    # also an open_clip model folder: `local-dir:<this folder>` loads it like a hub snapshot
    (out / FOLDER_CONFIG).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
    return {"steps": CLIP_STEPS, "final_loss": round(loss.item(), 4), "items": {"image": len(images),
            "video": len(videos)}, "architecture": TINY_CLIP}  # fmt: skip


# -- shared tokenizer ---------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes, nothing is unknown) trained on ``texts``, wrapped for
    transformers; it adds ``<s>`` ... ``</s>`` around every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=64,
    )


# -- tiny CLAP ----------------------------------------------------------------------------------------------------

CLAP_STEPS = 400
CLAP_SAMPLE_RATE = 16000
CLAP_SECONDS = 3


def tiny_clap_config(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import ClapConfig

    return ClapConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 72,
            "type_vocab_size": 1,
            "pad_token_id": pad_id,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        },
        audio_config={
            "spec_size": 64,
            "num_mel_bins": 32,
            "window_size": 4,
            "patch_size": 4,
            "patch_stride": [4, 4],
            "depths": [1, 1],
            "num_attention_heads": [2, 4],
            "patch_embeds_hidden_size": 32,
            "hidden_size": 64,
            "hidden_dropout_prob": 0.0,
        },
        projection_dim=64,
    )


def tiny_clap_feature_extractor():
    from transformers import ClapFeatureExtractor

    # 3 s at 16 kHz with a 25 ms hop: 121 frames of 32 mel bins, which the tiny HTSAT folds into 64 x 64
    return ClapFeatureExtractor(
        feature_size=32,
        sampling_rate=CLAP_SAMPLE_RATE,
        hop_length=400,
        max_length_s=CLAP_SECONDS,
        fft_window_size=800,
        frequency_min=50,
        frequency_max=8000,
        padding="pad",  # not "repeatpad": repeating a clip of two beeps would make it sound like six
        truncation="rand_trunc",  # never used: clips are cut to max_length_s before (deterministically)
    )


def train_clap(sample: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import ClapModel

    from curation.models.hf import pooled_embedding
    from curation.scoring.decode import audio_features, decode_audio

    rng = np.random.default_rng(TRAIN_SEED)
    items = _clean_items(sample, "audio")
    captions = [_captions(r, rng) for r in items]
    tokenizer = build_tokenizer([c for cs in captions for c in cs])
    fe = tiny_clap_feature_extractor()
    waves = [decode_audio((sample / r["path"]).read_bytes(), CLAP_SAMPLE_RATE, CLAP_SECONDS) for r in items]
    x = torch.from_numpy(audio_features(fe, waves))
    flat = [c for cs in captions for c in cs]
    enc = tokenizer(flat, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    ids = enc["input_ids"].view(len(items), PARAPHRASES, -1)
    mask = enc["attention_mask"].view(len(items), PARAPHRASES, -1)

    config = tiny_clap_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = ClapModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    scheduler = _schedule(optimizer, CLAP_STEPS)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    batch = 128
    loss = torch.tensor(0.0)
    for _ in range(CLAP_STEPS):
        i = torch.randint(len(items), (batch,), generator=g)
        k = torch.randint(PARAPHRASES, (batch,), generator=g)
        a = pooled_embedding(model.get_audio_features(input_features=x[i]))
        t = pooled_embedding(model.get_text_features(input_ids=ids[i, k], attention_mask=mask[i, k]))
        loss = _contrastive_loss(a, t, model.logit_scale_a)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    fe.save_pretrained(out)
    return {"steps": CLAP_STEPS, "final_loss": round(loss.item(), 4), "items": {"audio": len(items)},
            "architecture": "ClapModel"}  # fmt: skip


# -- tiny causal LM -----------------------------------------------------------------------------------------------

LM_STEPS = 200


def train_lm(sample: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    rng = np.random.default_rng(TRAIN_SEED)
    texts = [c for m in ("image", "video", "audio") for r in _clean_items(sample, m) for c in _captions(r, rng)]
    tokenizer = build_tokenizer(texts)
    enc = tokenizer(texts, padding="max_length", max_length=40, truncation=True, return_tensors="pt")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = _schedule(optimizer, LM_STEPS)
    g = torch.Generator().manual_seed(TRAIN_SEED)
    loss = torch.tensor(0.0)
    for _ in range(LM_STEPS):
        i = torch.randint(len(texts), (64,), generator=g)
        ids, mask = enc["input_ids"][i], enc["attention_mask"][i]
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"steps": LM_STEPS, "final_loss": round(loss.item(), 4), "texts": len(texts), "architecture": "GPT2"}


TRAINERS: dict[str, Callable[[Path, Path], dict[str, Any]]] = {"clip": train_clip, "clap": train_clap, "lm": train_lm}


def clap_features(feature_extractor, waves: list[np.ndarray]) -> np.ndarray:
    """CLAP inputs for mono waveforms; kept for callers of its first home, see
    :func:`curation.scoring.decode.audio_features`."""
    from curation.scoring.decode import audio_features

    return audio_features(feature_extractor, waves)
