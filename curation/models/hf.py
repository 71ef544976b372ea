"""Audio-text (CLAP) and causal language models through transformers: by hub id (read from the local Hugging Face
cache; nothing is downloaded when ``HF_HUB_OFFLINE=1``), by a local ``save_pretrained`` folder, or the embedded
bootstrap models. Weights load with safetensors, or ``torch.load(weights_only=True)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def resolve_hf(spec: Any, bootstrap_name: str) -> str:
    """The id or folder that ``from_pretrained`` gets for a ``ScoreConfig.Model``; trains the bootstrap model on
    first use."""
    if spec.path:
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a model folder (a transformers save_pretrained output)")
        return str(path)
    if spec.name == "bootstrap":
        from curation.models.bootstrap import ensure

        return str(ensure(bootstrap_name))
    return spec.name


def _dtype(precision: str):
    import torch

    return getattr(torch, DTYPES[precision])


def _no_progress_bars() -> None:
    """transformers draws a "Loading weights" bar per load: one per actor, in the middle of the run's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_clap(spec: Any, device: str = "cpu", precision: str = "fp32"):
    """Returns ``(model, tokenizer, feature_extractor)`` of a transformers ``ClapModel``, in eval mode."""
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    _no_progress_bars()
    source = resolve_hf(spec, "clap")
    model = ClapModel.from_pretrained(source, dtype=_dtype(precision), weights_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    feature_extractor = ClapFeatureExtractor.from_pretrained(source)
    return model, tokenizer, feature_extractor


def load_clap_feature_extractor(spec: Any):
    """Only the audio feature extractor (no weights): the decode plan takes what decode tasks need from it."""
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor.from_pretrained(resolve_hf(spec, "clap"))


def load_causal_lm(spec: Any, device: str = "cpu", precision: str = "fp32"):
    """Returns ``(model, tokenizer)`` of a transformers causal LM, in eval mode; the tokenizer always has a pad
    token (GPT-2's has none: its end-of-text token stands in, masked out anyway)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _no_progress_bars()
    source = resolve_hf(spec, "lm")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(precision), weights_only=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer


def pooled_embedding(out):
    """The L2-normalised embedding from ``get_text_features``/``get_audio_features``: transformers 5 returns a
    ModelOutput (its ``pooler_output``), older versions a tensor."""
    import torch
    import torch.nn.functional as F

    emb = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(emb.float(), dim=-1)
