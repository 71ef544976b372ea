"""Model loading as a user with downloaded weights does it (tiny checkpoints saved by the tests), the shipped text
models, the model cache, and the embedded bootstrap models."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curation.config import ScoreConfig
from curation.models.cache import atomic_dir, cache_root, file_lock

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a small red circle in the top left", "a blue square on a white background", "two short high beeps"]


def spec(**kw) -> ScoreConfig.Model:
    return ScoreConfig.Model(**kw)


@pytest.fixture(scope="module")
def tiny_open_clip():
    """A randomly initialised model of our registered open_clip config, and a batch to compare outputs on."""
    import open_clip
    import torch

    from curation.models.clip import TINY_CLIP, register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP).eval()
    images = torch.randn(2, 3, 48, 48)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(CAPTIONS[:2])
    with torch.no_grad():
        expected = (model.encode_image(images), model.encode_text(tokens))
    return model, images, tokens, expected


def _same_outputs(model, images, tokens, expected) -> bool:
    import torch

    with torch.no_grad():
        got = (model.encode_image(images), model.encode_text(tokens))
    return all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, expected))


# -- open_clip --------------------------------------------------------------------------------------------------


@pytest.mark.quick
def test_open_clip_from_a_local_safetensors_checkpoint(tmp_path, tiny_open_clip):
    from safetensors.torch import save_file

    from curation.models.clip import load_clip

    model, images, tokens, expected = tiny_open_clip
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    loaded, tokenizer, preprocess = load_clip(spec(name="curation-tiny-clip", path=str(ckpt)))
    assert _same_outputs(loaded, images, tokens, expected)
    assert preprocess["size"] in (48, (48, 48)) and tokenizer(["x"]).shape == (1, 24)
    # `pretrained` takes a file too, as open_clip's own argument does
    loaded, _, _ = load_clip(spec(name="curation-tiny-clip", pretrained=str(ckpt)))
    assert _same_outputs(loaded, images, tokens, expected)


@pytest.mark.quick
def test_open_clip_from_a_torch_checkpoint_and_a_model_folder(tmp_path, tiny_open_clip):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from curation.models.clip import TINY_CLIP, load_clip

    model, images, tokens, expected = tiny_open_clip
    pt = tmp_path / "epoch_1.pt"  # open_clip's training script saves {"state_dict": ...}
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, pt)
    loaded, _, _ = load_clip(spec(name=TINY_CLIP, path=str(pt)))
    assert _same_outputs(loaded, images, tokens, expected)

    folder = tmp_path / "snapshot"  # the layout of an open_clip hub snapshot
    folder.mkdir()
    cfg = {"model_cfg": open_clip.get_model_config(TINY_CLIP), "preprocess_cfg": {"resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    for s in (spec(path=str(folder)), spec(name=f"local-dir:{folder}")):
        loaded, _, preprocess = load_clip(s)
        assert _same_outputs(loaded, images, tokens, expected)
        assert preprocess["resize_mode"] == "squash"


@pytest.mark.quick
def test_open_clip_refuses_pickled_code_and_missing_weights(tmp_path):
    import torch

    from curation.models.clip import TINY_CLIP, load_clip

    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": subprocess.Popen}, evil)  # a global, not a tensor
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|not allowed"):
        load_clip(spec(name=TINY_CLIP, path=str(evil)))
    with pytest.raises(ValueError, match="no weights"):
        load_clip(spec(name="ViT-B-32"))  # an architecture alone would score with random weights
    with pytest.raises(FileNotFoundError):
        load_clip(spec(name=TINY_CLIP, path=str(tmp_path / "missing.safetensors")))


# -- transformers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory):
    """A tiny GPT-2 and its tokenizer written with save_pretrained, as a downloaded model folder looks."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from curation.models.bootstrap import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = build_tokenizer(CAPTIONS * 4, vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.quick
def test_causal_lm_from_a_local_folder_scores_perplexity(tiny_lm_folder):
    import math

    from curation.scoring.perplexity import PerplexityScorer

    scorer = PerplexityScorer(spec(path=str(tiny_lm_folder)))
    assert next(scorer.model.parameters()).dtype.is_floating_point
    batch = pa.table({"caption": [*CAPTIONS, "", "x" * 2000]})
    out = scorer(batch).column("perplexity").to_pylist()
    assert all(v is not None and math.isfinite(v) and v > 1 for v in out[:3] + out[4:])
    assert out[3] is None  # an empty caption has no perplexity (and is not an error)
    # a random model over ~300 tokens: perplexity near its vocabulary size
    assert 50 < np.median(out[:3]) < 3000
    # batch composition does not change a record's score
    alone = scorer(pa.table({"caption": [CAPTIONS[1]]})).column("perplexity")[0].as_py()
    assert alone == pytest.approx(out[1], rel=1e-4)


@pytest.mark.quick
def test_clap_from_a_local_folder(tmp_path):
    import torch
    from transformers import ClapModel

    from curation.models.bootstrap import build_tokenizer, tiny_clap_config, tiny_clap_feature_extractor
    from curation.models.hf import load_clap
    from curation.scoring.clap_similarity import ClapSimilarityScorer
    from curation.scoring.decode import audio_features

    tokenizer = build_tokenizer(CAPTIONS * 4, vocab_size=300)
    torch.manual_seed(0)
    config = tiny_clap_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    ClapModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tiny_clap_feature_extractor().save_pretrained(tmp_path)

    model, tok, fe = load_clap(spec(path=str(tmp_path)))
    assert fe.sampling_rate == 16000 and len(tok) == len(tokenizer)
    scorer = ClapSimilarityScorer(spec(path=str(tmp_path)))
    t = np.arange(16000, dtype=np.float32) / 16000
    feats = audio_features(fe, [np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 2000 * t)])
    sims, embs = scorer.score(feats, CAPTIONS[:2])
    assert sims.shape == (2,) and np.all(np.abs(sims) <= 1.0 + 1e-5)
    assert np.allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)


# -- shipped text models ----------------------------------------------------------------------------------------


@pytest.mark.quick
def test_language_id_uses_the_shipped_lid176():
    from curation.models.text import lid_model_path
    from curation.scoring.language import LanguageIdScorer

    assert lid_model_path().name == "lid.176.ftz" and lid_model_path().is_file()
    scorer = LanguageIdScorer(spec(name="lid.176"))
    texts = ["a large red star in the top left corner", "Ein roter Kreis oben links auf weißem Hintergrund",
             "Un cercle rouge en haut à gauche sur fond blanc", "line one\nline two in english", ""]  # fmt: skip
    out = scorer(pa.table({"caption": texts})).to_pydict()
    assert out["lang"][:4] == ["en", "de", "fr", "en"]
    assert all(0 < s <= 1 for s in out["lang_score"][:4])
    assert out["lang"][4] is None and out["lang_score"][4] is None


@pytest.mark.quick
def test_minilm_text_embedder_loads_offline():
    from curation.models.text import load_text_embedder, minilm_path

    assert (minilm_path() / "model.safetensors").is_file()
    model = load_text_embedder()
    emb = model.encode(["a red circle", "a crimson round shape", "quarterly invoice ledger"], normalize_embeddings=True)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


# -- the cache ------------------------------------------------------------------------------------------------


@pytest.mark.quick
def test_cache_root_and_atomic_model_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATION_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("CURATION_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "curation" / "models"

    final = tmp_path / "model-v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half-written").write_text("x")
            raise RuntimeError("killed while training")
    assert not final.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("ok")
    assert (final / "weights").read_text() == "ok"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.quick
def test_file_lock_serialises_processes(tmp_path):
    lock, log = tmp_path / "train.lock", tmp_path / "log"
    holder = (
        "import sys, time; from pathlib import Path; from curation.models.cache import file_lock\n"
        f"with file_lock(Path({str(lock)!r})):\n"
        f"    Path({str(log)!r}).write_text('held\\n'); time.sleep(1.5)\n"
        f"    open({str(log)!r}, 'a').write('released\\n')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], cwd=ROOT)
    deadline = time.time() + 30
    while not log.exists() and time.time() < deadline:
        time.sleep(0.05)
    with file_lock(lock):
        assert log.read_text() == "held\nreleased\n"  # we got the lock only after the holder let go
    assert proc.wait(30) == 0


# -- the embedded models --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bootstrap_models_are_cached_and_listed(bootstrap_models, capsys):
    from curation.cli import main
    from curation.models.bootstrap import BOOTSTRAP_VERSION, TRAIN_SEED, ensure

    assert set(bootstrap_models) == {"clip", "clap", "lm"}
    for kind, path in bootstrap_models.items():
        meta = json.loads((path / "metadata.json").read_text())
        assert meta["version"] == BOOTSTRAP_VERSION and meta["train_seed"] == TRAIN_SEED != 0
        assert any(path.glob("*.safetensors"))
        started = time.time()
        assert ensure(kind) == path and time.time() - started < 1  # cached: no training
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tiny-clip" in out and "lid.176" in out and "not trained" not in out.split("lid.176")[0]


@pytest.mark.slow
def test_bootstrap_clip_tells_matching_from_mismatched_captions(bootstrap_models, sample_dir, labels):
    """The tiny CLIP, trained on seed 1234, separates the seed-0 sample's clean and mismatched image captions."""
    from curation.scoring.clip_similarity import ClipSimilarityScorer
    from curation.scoring.decode import DecodePlan, decode_one

    scorer = ClipSimilarityScorer(spec())
    plan = DecodePlan(image=scorer.model.visual.preprocess_cfg)
    rows = [r for r in labels if r["modality"] == "image" and r["defect"] in (None, "mismatched_caption")][:120]
    arrays = [decode_one((sample_dir / r["path"]).read_bytes(), "image", plan) for r in rows]
    sims, embs = scorer.score(arrays, [r["caption"] for r in rows])
    clean = sims[[r["defect"] is None for r in rows]]
    bad = sims[[r["defect"] is not None for r in rows]]
    assert len(bad) >= 3 and np.median(clean) - np.median(bad) > 0.3
    assert np.allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
