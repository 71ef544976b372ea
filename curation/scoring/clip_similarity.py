"""Image-text and video-text similarity with an open_clip model: the cosine of the media and caption embeddings.
A video's embedding is the mean of its N uniformly sampled frames' (normalised) embeddings, re-normalised.

On a GPU, tokenizing the captions (open_clip's Python tokenizer, about 70 us a caption) took a third of the
actor's time per record, more than the image forward; there :func:`add_clip_tokens` tokenizes in the tasks before
the actor, on the cores the actor does not use. On CPU the actor tokenizes itself: the work is the same and the
task workers then import no torch."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from curation.scoring.base import MediaTextScorer, limit_threads, resolve_device

TOKENS_COLUMN = "clip_tokens"  # the captions' CLIP tokens, added by a task before the actor (dropped by the actor)
_TOKENIZERS: dict[tuple, Any] = {}  # one tokenizer per task worker process and model


def add_clip_tokens(batch: pa.Table, spec: Any) -> pa.Table:
    """Ray Data batch function: the open_clip tokens of the captions of the image and video rows that decoded,
    by the model's own tokenizer, as a ``fixed_size_list<int32>`` column (null for the other rows)."""
    from curation.scoring.decode import media_rows

    key = (spec.name, spec.pretrained, spec.path)
    if key not in _TOKENIZERS:
        from curation.models.clip import load_clip_tokenizer

        _TOKENIZERS[key] = load_clip_tokenizer(spec)
    tokenizer = _TOKENIZERS[key]
    todo, rows = media_rows(batch, ClipSimilarityScorer.modalities)
    # every block's column has the tokenizer's context length, also a block with no such row: Ray Data joins
    # blocks into the actor's batches, and lists of two sizes would not join
    full = np.zeros((batch.num_rows, tokenizer.context_length), np.int32)
    if todo:
        full[todo] = tokenizer([rows["caption"][i] or "" for i in todo]).numpy()
    missing = np.ones(batch.num_rows, bool)
    missing[todo] = False
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), full.shape[1], mask=pa.array(missing))
    return batch.append_column(TOKENS_COLUMN, tokens)


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
        from curation.scoring.decode import ImagePreprocessor

        limit_threads(spec.num_cpus)
        self.device, precision = resolve_device(spec, has_gpu)
        self.model, self.tokenizer, cfg = load_clip(spec, self.device, precision)
        self.dtype = input_dtype(precision)
        self.preprocess = ImagePreprocessor(cfg)  # the geometry (for inputs not yet resized), mean and std
        self.batch_size = spec.batch_size
        self.drop_inputs = drop_inputs

    def embed_media(self, arrays: list[np.ndarray]):
        """Normalised embeddings of images (H, W, 3) and videos (F, H, W, 3), all frames in one forward pass.
        Frames not at the model's input size (decoded for a GPU actor) are resized here first, on its device."""
        import torch
        import torch.nn.functional as F

        from curation.scoring.decode import ImagePreprocessor, frame_runs, to_device

        pre = self.preprocess
        pixels = frame_runs(arrays)
        if any(p.shape[1:3] != pre.hw for p in pixels):
            pixels = pre.resized(arrays, self.device)
        x = ImagePreprocessor.to_tensor(pixels, pre.mean, pre.std, self.device, self.dtype)
        with torch.inference_mode():
            emb = F.normalize(self.model.encode_image(x).float(), dim=-1)
        # the frames' owners are worked out on the host: made on the GPU (``repeat_interleave`` over counts there)
        # they made the host wait for the image forward before it could queue the text forward
        counts = np.array([1 if a.ndim == 3 else a.shape[0] for a in arrays], dtype=np.int64)
        owner = to_device(np.repeat(np.arange(len(arrays)), counts), emb.device)
        pooled = torch.zeros(len(arrays), emb.shape[1], device=emb.device).index_add_(0, owner, emb)
        return F.normalize(pooled / to_device(counts, emb.device)[:, None], dim=-1)

    def text_inputs(self, batch: pa.Table, rows: dict[str, list], todo: list[int]) -> Any:
        """The rows' tokens from :func:`add_clip_tokens` (an ``(rows, context)`` array) when a task made them,
        else their captions."""
        if TOKENS_COLUMN not in batch.column_names:
            return super().text_inputs(batch, rows, todo)
        tokens = batch.column(TOKENS_COLUMN).take(pa.array(todo, pa.int64())).combine_chunks()
        if tokens.null_count:  # not made for every row this scorer handles: tokenize here
            return super().text_inputs(batch, rows, todo)
        return tokens.flatten().to_numpy().reshape(len(todo), tokens.type.list_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        return out.drop_columns([TOKENS_COLUMN]) if TOKENS_COLUMN in out.column_names else out

    def embed_text(self, captions: list[str] | np.ndarray):
        """Normalised caption embeddings, from captions or from their tokens (an ``(n, context)`` array)."""
        import torch
        import torch.nn.functional as F

        from curation.scoring.decode import to_device

        if isinstance(captions, np.ndarray):
            tokens = to_device(captions, self.device).long()
        else:
            tokens = to_device(self.tokenizer(captions), self.device)
        with torch.inference_mode():
            return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def score(self, arrays: list[np.ndarray], captions: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, media embeddings) for decoded inputs and their captions (or the captions' tokens)."""
        media = self.embed_media(arrays)
        text = self.embed_text(captions)
        return (media * text).sum(-1).cpu().numpy(), media.cpu().numpy()
