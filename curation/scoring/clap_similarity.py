"""Audio-text similarity with a CLAP model (transformers ``ClapModel``): the cosine of the audio and caption
embeddings. The decode tasks send each clip's log-mel, or, when the actor has a GPU, its samples, and the actor
makes the log-mels there (:meth:`AudioFeatures.log_mel_on`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.scoring.base import MediaTextScorer, limit_threads, resolve_device


class ClapSimilarityScorer(MediaTextScorer):
    """CLAP similarity of audio rows; fills ``clip_score`` and ``embedding`` (L2-normalised).

    Args:
        spec: the ``score.audio_text`` model (``ScoreConfig.Model``).
        has_gpu: whether Ray gave this actor a GPU.
        drop_inputs: remove the decoded inputs from the batch afterwards.
    """

    name = "audio_text"
    modalities = ("audio",)

    def __init__(self, spec: Any, has_gpu: bool = False, drop_inputs: bool = False):
        from curation.models.hf import load_clap
        from curation.scoring.decode import AudioFeatures

        limit_threads(spec.num_cpus)
        self.device, precision = resolve_device(spec, has_gpu)
        self.model, self.tokenizer, feature_extractor = load_clap(spec, self.device, precision)
        self.features = AudioFeatures.of(feature_extractor)
        self.dtype = next(self.model.parameters()).dtype
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 514) - 2
        self.max_tokens = min(max_len, getattr(self.tokenizer, "model_max_length", max_len) or max_len, 512)
        self.batch_size = spec.batch_size
        self.drop_inputs = drop_inputs

    def score(self, arrays: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, audio embeddings) for decoded clips (log-mels, or samples: see
        :meth:`AudioFeatures.model_inputs`) and their captions."""
        import torch

        from curation.models.hf import pooled_embedding
        from curation.scoring.decode import to_device

        x = self.features.model_inputs(arrays, self.device, self.dtype)
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        enc = {k: to_device(v, self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            audio = pooled_embedding(self.model.get_audio_features(input_features=x))
            text = pooled_embedding(self.model.get_text_features(**enc))
        return (audio * text).sum(-1).cpu().numpy(), audio.cpu().numpy()
