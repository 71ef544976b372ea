"""The multimodal model: frozen media towers, one projector per modality, and a causal LM.

Images and video frames go through the open_clip image tower (patch tokens; video frames pooled over time), audio
through the CLAP audio tower; each modality's tokens are pooled to ``media_tokens`` positions and projected into the
LM's embedding space. A sample's input ids hold one :data:`MEDIA_TOKEN_INDEX` per media position (the data
pipeline expands the single media token to as many as the tower yields); those positions get the projected media
embeddings and every other position the LM's token embedding: LLaVA's idea of splicing features into the
sequence, done here as one masked assignment because every sample has exactly one media item at known positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from curation.instruct import IGNORE_INDEX, MEDIA_TOKEN_INDEX
from curation.train.args import ModelArgs, StageArgs

MODALITIES = ("image", "video", "audio")


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """``linear`` (LLaVA-1) or ``mlp2x_gelu`` (LLaVA-1.5: Linear, GELU, Linear)."""
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
    raise ValueError(f"unknown projector {kind!r}")


def pool_tokens(tokens: torch.Tensor, k: int | None) -> torch.Tensor:
    """(B, N, D) -> (B, k, D) by average pooling; over the 2-D patch grid when both N and k are squares."""
    n = tokens.shape[1]
    if k is None or k == n:
        return tokens
    side, kside = math.isqrt(n), math.isqrt(k)
    if side * side == n and kside * kside == k:
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
        return F.adaptive_avg_pool2d(grid, kside).flatten(2).transpose(1, 2)
    return F.adaptive_avg_pool1d(tokens.transpose(1, 2), k).transpose(1, 2)


class ImageTower(nn.Module):
    """The open_clip image tower, frozen; returns its patch tokens (before the final projection)."""

    def __init__(self, visual: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.visual = visual
        self.visual.output_tokens = True
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.width = int(visual.transformer.width)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> (N, patches, width)."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
        x = ((x - self.mean) / self.std).to(next(self.visual.parameters()).dtype)
        _, tokens = self.visual(x)
        return tokens


class AudioTower(nn.Module):
    """The CLAP audio tower (HTSAT), frozen; returns its last hidden state as a token sequence."""

    def __init__(self, audio_model: nn.Module):
        super().__init__()
        self.audio = audio_model
        self.width = int(audio_model.config.hidden_size)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1, T, F) log-mel features -> (N, tokens, width)."""
        out = self.audio(input_features=features.to(next(self.audio.parameters()).dtype))
        hidden = out.last_hidden_state
        if hidden.dim() == 4:  # (N, C, H, W) feature map: flatten the grid into tokens
            hidden = hidden.flatten(2).transpose(1, 2)
        return hidden


class MultimodalLM(nn.Module):
    """Frozen towers + per-modality projectors + a causal LM.

    Args:
        image_tower / audio_tower: the frozen encoders (``None`` when a modality is not used).
        llm: a transformers causal LM.
        args: projector kind, media tokens, video pooling.
    """

    def __init__(self, image_tower: ImageTower | None, audio_tower: AudioTower | None, llm: nn.Module,
                 args: ModelArgs):  # fmt: skip
        super().__init__()
        self.args = args
        self.image_tower = image_tower
        self.audio_tower = audio_tower
        self.llm = llm
        d_llm = llm.get_input_embeddings().embedding_dim
        self.projectors = nn.ModuleDict()
        if image_tower is not None:
            self.projectors["image"] = build_projector(args.projector, image_tower.width, d_llm)
            self.projectors["video"] = build_projector(args.projector, image_tower.width, d_llm)
        if audio_tower is not None:
            self.projectors["audio"] = build_projector(args.projector, audio_tower.width, d_llm)
        for tower in (image_tower, audio_tower):
            if tower is not None:
                tower.requires_grad_(False)

    def train(self, mode: bool = True) -> MultimodalLM:
        super().train(mode)
        for tower in (self.image_tower, self.audio_tower):
            if tower is not None:
                tower.eval()  # frozen: no dropout, no batch-norm updates, ever
        return self

    @torch.no_grad()
    def media_token_counts(self, image_size: int, audio_shape: tuple[int, ...] | None) -> dict[str, int]:
        """LM positions one item of each modality takes (the data pipeline expands media tokens to these)."""
        counts = {}
        if self.image_tower is not None:
            probe = torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8, device=self._device())
            n = pool_tokens(self.image_tower(probe), self.args.media_tokens).shape[1]
            counts["image"] = counts["video"] = n
        if self.audio_tower is not None and audio_shape is not None:
            probe = torch.zeros(1, *audio_shape, device=self._device())
            counts["audio"] = pool_tokens(self.audio_tower(probe), self.args.media_tokens).shape[1]
        return counts

    def _device(self) -> torch.device:
        return next(self.llm.parameters()).device

    def encode(self, modality: str, media: torch.Tensor) -> torch.Tensor:
        """Media of one modality -> projected embeddings (N, k, d_llm)."""
        k = self.args.media_tokens
        if modality == "image":
            tokens = self.image_tower(media)
        elif modality == "video":
            n, t = media.shape[:2]
            frames = self.image_tower(media.flatten(0, 1))
            frames = frames.view(n, t, *frames.shape[1:])
            tokens = frames.mean(1) if self.args.video_pool == "mean" else frames.amax(1)
        else:
            tokens = self.audio_tower(media)
        projector = self.projectors[modality]
        tokens = pool_tokens(tokens, k).to(next(projector.parameters()).dtype)
        return projector(tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                media: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:  # fmt: skip
        """Mean next-token loss over the labelled positions. ``media`` maps a modality to (sample indices, media
        tensor); every sample has exactly one media item."""
        embed = self.llm.get_input_embeddings()
        is_media = input_ids == MEDIA_TOKEN_INDEX
        embeds = embed(input_ids.clamp(min=0))
        per_sample = torch.zeros(input_ids.shape[0], 0, embeds.shape[-1], device=embeds.device, dtype=embeds.dtype)
        parts, order = [], []
        for modality, (index, tensor) in media.items():
            parts.append(self.encode(modality, tensor).to(embeds.dtype))
            order.append(index)
        if parts:
            feats = torch.cat(parts)
            per_sample = feats[torch.argsort(torch.cat(order).to(feats.device))]
            embeds = embeds.masked_scatter(is_media.unsqueeze(-1), per_sample)
        # a projector with no sample in this batch still joins the graph, so DDP/FSDP see a gradient for every
        # trainable parameter on every rank (find_unused_parameters would cost a graph walk each step)
        unused = [p for m, proj in self.projectors.items() if m not in media for p in proj.parameters()]
        logits = self.llm(inputs_embeds=embeds, attention_mask=attention_mask).logits
        loss = lm_loss(logits, labels)
        if unused:
            loss = loss + 0.0 * sum(p.sum() for p in unused)
        return loss


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labelled positions; 0 (not NaN) when a batch has none."""
    shift_logits = logits[:, :-1].flatten(0, 1).float()
    shift_labels = labels[:, 1:].flatten()
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


def prepare_models(args: ModelArgs, modalities: set[str]) -> None:
    """Train the bootstrap models the ``modalities`` need, if not cached, in the calling process. The train stage
    calls this in the driver before its workers start: a worker inside torch.distributed is not rank 0 and
    transformers' ``save_pretrained`` writes nothing there."""
    from curation.models.clip import resolve_clip
    from curation.models.hf import resolve_hf

    if modalities & {"image", "video"}:
        resolve_clip(args.vision)
    if "audio" in modalities:
        resolve_hf(args.audio, "clap")
    resolve_hf(args.llm, "lm")


def build_model(args: ModelArgs, modalities: set[str], device: str = "cpu", precision: str = "fp32"):
    """Load the towers the ``modalities`` need and the LM; returns ``(model, tokenizer, media_info)`` where
    ``media_info`` holds what the data pipeline needs to decode media for these towers."""
    from curation.models.clip import load_clip
    from curation.models.hf import load_causal_lm, load_clap

    info: dict[str, Any] = {}
    image_tower = audio_tower = None
    if modalities & {"image", "video"}:
        clip, _, preprocess = load_clip(args.vision, device=device)
        image_tower = ImageTower(clip.visual, preprocess["mean"], preprocess["std"])
        info["image_preprocess"] = preprocess
        del clip  # the text tower is not needed
    if "audio" in modalities:
        clap, _, feature_extractor = load_clap(args.audio, device=device)
        audio_tower = AudioTower(clap.audio_model)
        info["feature_extractor"] = feature_extractor
        del clap
    llm, tokenizer = load_causal_lm(args.llm, device=device, precision=precision)
    model = MultimodalLM(image_tower, audio_tower, llm, args).to(device)
    size = preprocess["size"] if image_tower is not None else 0
    info["image_size"] = size if isinstance(size, int) else size[0]
    audio_shape = None
    if audio_tower is not None:
        import numpy as np

        from curation.models.bootstrap import clap_features

        fe = info["feature_extractor"]
        audio_shape = clap_features(fe, [np.zeros(fe.nb_max_samples, np.float32)]).shape[1:]
    info["media_tokens"] = model.media_token_counts(info["image_size"], audio_shape)
    info["context"] = int(getattr(llm.config, "max_position_embeddings", None) or llm.config.n_positions)
    return model, tokenizer, info


def configure_trainable(model: MultimodalLM, stage: StageArgs) -> MultimodalLM:
    """Freeze or open the LM for a stage: ``frozen`` (projectors only), ``full``, or ``lora`` (peft adapters on
    every linear layer of the LM; the LM's own weights stay frozen)."""
    model.llm.requires_grad_(stage.llm == "full")
    if stage.llm == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=stage.lora_r, lora_alpha=stage.lora_alpha, lora_dropout=stage.lora_dropout,
                            target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
        model.llm = get_peft_model(model.llm, config)
    model.projectors.requires_grad_(True)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint must hold: every parameter that trains (frozen towers are referenced by spec)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
