"""Image-text and video-text similarity with an open_clip model: the cosine of the media and caption embeddings.
A video's embedding is the mean of its N uniformly sampled frames' (normalised) embeddings, re-normalised."""

from __future__ import annotations

from typing import Any

import numpy as np

from curation.scoring.base import MediaTextScorer, limit_threads, resolve_device


class ClipSimilarityScorer(MediaTextScorer):
    """CLIP similarity of image and video rows; fills ``clip_score`` and ``embedding`` (L2-normalised).

    Args:
        spec: the ``score.image_text`` model (``ScoreConfig.Model``).
        has_gpu: whether Ray gave this actor a GPU.
        drop_inputs: remove the decoded inputs from the batch afterwards (when no later scorer needs them).
    """

    name = "image_text"
    modalities = ("image", "video")

    def __init__(self, spec: Any, has_gpu: bool = False, drop_inputs: bool = False):
        from curation.models.clip import input_dtype, load_clip

        limit_threads(spec.num_cpus)
        self.device, precision = resolve_device(spec, has_gpu)
        self.model, self.tokenizer, cfg = load_clip(spec, self.device, precision)
        self.dtype = input_dtype(precision)
        self.mean, self.std = tuple(cfg["mean"]), tuple(cfg["std"])
        self.batch_size = spec.batch_size
        self.drop_inputs = drop_inputs

    def embed_media(self, arrays: list[np.ndarray]):
        """Normalised embeddings of images (H, W, 3) and videos (F, H, W, 3), all frames in one forward pass."""
        import torch
        import torch.nn.functional as F

        from curation.scoring.decode import ImagePreprocessor, frame_runs

        x = ImagePreprocessor.to_tensor(frame_runs(arrays), self.mean, self.std, self.device, self.dtype)
        with torch.inference_mode():
            emb = F.normalize(self.model.encode_image(x).float(), dim=-1)
        counts = torch.tensor([1 if a.ndim == 3 else a.shape[0] for a in arrays], device=emb.device)
        owner = torch.repeat_interleave(torch.arange(len(arrays), device=emb.device), counts)
        pooled = torch.zeros(len(arrays), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        return F.normalize(pooled / counts[:, None], dim=-1)

    def embed_text(self, captions: list[str]):
        import torch
        import torch.nn.functional as F

        tokens = self.tokenizer(captions).to(self.device)
        with torch.inference_mode():
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def score(self, arrays: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, media embeddings) for decoded inputs and their captions."""
        media = self.embed_media(arrays)
        text = self.embed_text(captions)
        return (media * text).sum(-1).cpu().numpy(), media.cpu().numpy()
