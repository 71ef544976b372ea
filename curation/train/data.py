"""Training data: webdataset shards (a release, or a crawl for comparison) read sample by sample, rendered with a
chat template, media tokens expanded, human turns masked out of the labels, batched with length grouping.

The shards are indexed once (tar member offsets, read from the headers), so a sample is one seek and read: the
order of a run is a pure function of (seed, step) and a resumed run reads exactly the batches the killed one would
have. Decoding (image resize, video frames, audio features) and tokenizing run in DataLoader worker processes,
prefetched ahead of the training step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.fsutil import tar_index
from curation.instruct import IGNORE_INDEX, MEDIA_TOKEN_INDEX, pretrain_conversation, tokenize_conversation
from curation.scoring.decode import DecodeError

MEDIA_EXTS = {
    "image": ("jpg", "jpeg", "png", "webp", "gif", "bmp"),
    "video": ("mp4", "webm", "mkv", "mov", "avi"),
    "audio": ("wav", "flac", "mp3", "ogg", "m4a"),
}


@dataclass
class SampleRef:
    """Where one sample's members sit: the tar and (offset, size) of its media and json members."""

    key: str
    tar: str
    modality: str
    media: tuple[int, int]
    meta: tuple[int, int]
    length: int  # words in the conversation: the length-grouping key, known without tokenizing


def index_shards(tars: list[Path]) -> list[SampleRef]:
    """Scan tar headers (and the small json members) of ``tars``; samples without media or json are skipped."""
    ext_modality = {e: m for m, exts in MEDIA_EXTS.items() for e in exts}
    refs = []
    for tar in sorted(tars):
        members: dict[str, dict[str, tuple[int, int]]] = {}
        for name, where in tar_index(tar).items():
            key, _, ext = name.partition(".")
            members.setdefault(key, {})[ext.lower()] = where
        with open(tar, "rb") as f:
            for key, exts in members.items():
                media = [(e, exts[e]) for e in exts if e in ext_modality]
                if not media or "json" not in exts:
                    continue
                meta = json.loads(_read(f, *exts["json"]))
                turns = meta.get("conversations") or [{"value": meta.get("caption", "")}]
                length = sum(len(t["value"].split()) for t in turns)
                refs.append(SampleRef(key, str(tar), ext_modality[media[0][0]], media[0][1], exts["json"], length))
    return refs


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


class ConversationDataset(torch.utils.data.Dataset):
    """Decoded, tokenized samples of a list of :class:`SampleRef`.

    Args:
        refs: the samples.
        tokenizer: the LM's tokenizer.
        template: ``plain`` (stage 1: media token + caption, from ``pretrain_conversations``) or ``vicuna_v1``
            (stage 2: the instruction ``conversations``). Crawl shards have no conversations: their caption
            becomes a stage-1 conversation.
        media_tokens: LM positions per media item, by modality.
        media_info: decoding settings from :func:`curation.train.model.build_model`.
        max_length: tokens per sample; longer ones are cut at the end.
        video_frames: frames per video.
    """

    def __init__(self, refs: list[SampleRef], tokenizer: Any, template: str, media_tokens: dict[str, int],
                 media_info: dict[str, Any], max_length: int, video_frames: int, system_prompt: str = ""):  # fmt: skip
        self.refs = refs
        self.tokenizer = tokenizer
        self.template = template
        self.media_tokens = media_tokens
        self.info = media_info
        self.max_length = max_length
        self.video_frames = video_frames
        self.system_prompt = system_prompt
        self._files: dict[str, Any] = {}
        self._image = None

    def __len__(self) -> int:
        return len(self.refs)

    def _file(self, path: str):
        # one open handle per tar per worker process (handles do not survive fork, so opened lazily)
        if path not in self._files:
            self._files[path] = open(path, "rb")  # noqa: SIM115 (kept open for the worker's life)
        return self._files[path]

    def turns(self, meta: dict[str, Any]) -> list[dict[str, str]]:
        if self.template == "plain" and meta.get("pretrain_conversations"):
            return meta["pretrain_conversations"]
        if self.template != "plain" and meta.get("conversations"):
            return meta["conversations"]
        record = meta.get("record") or meta  # a crawl shard's json is the record itself
        return pretrain_conversation(record)

    def tokens(self, meta: dict[str, Any], modality: str) -> tuple[list[int], list[int]]:
        """Input ids with the media token expanded to its positions, and labels with human turns masked."""
        ids, labels = tokenize_conversation(self.tokenizer, self.turns(meta), self.template, self.system_prompt)
        k = self.media_tokens[modality]
        at = ids.index(MEDIA_TOKEN_INDEX)
        ids = ids[:at] + [MEDIA_TOKEN_INDEX] * k + ids[at + 1 :]
        labels = labels[:at] + [IGNORE_INDEX] * k + labels[at + 1 :]
        if at + k > self.max_length:
            raise DecodeError(f"media token at {at} does not fit max_length {self.max_length}")
        return ids[: self.max_length], labels[: self.max_length]

    def media(self, data: bytes, modality: str) -> np.ndarray:
        from curation.scoring.decode import ImagePreprocessor, decode_audio, open_image, sample_video_frames

        if modality == "audio":
            from curation.models.bootstrap import clap_features

            fe = self.info["feature_extractor"]
            wave = decode_audio(data, fe.sampling_rate, fe.nb_max_samples / fe.sampling_rate)
            return clap_features(fe, [wave])[0]
        if self._image is None:
            self._image = ImagePreprocessor(self.info["image_preprocess"])
        if modality == "image":
            return self._image.pixels(open_image(data, self._image.size))
        return np.stack([self._image.pixels(f) for f in sample_video_frames(data, self.video_frames)])

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        ref = self.refs[i]
        f = self._file(ref.tar)
        meta = json.loads(_read(f, *ref.meta))
        try:
            media = self.media(_read(f, *ref.media), ref.modality)
            ids, labels = self.tokens(meta, ref.modality)
        except DecodeError:
            return None  # the crawl probed every file, so this is rare: the batch goes on without it
        return {"input_ids": ids, "labels": labels, "modality": ref.modality, "media": media}


def collate(samples: list[dict[str, Any] | None], pad_id: int) -> dict[str, Any]:
    """Right-padded ids, labels and mask; media grouped by modality as (sample indices, stacked tensor)."""
    samples = [s for s in samples if s is not None]
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    groups: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
        index, arrays = groups.setdefault(s["modality"], ([], []))
        index.append(i)
        arrays.append(s["media"])
    media = {m: (torch.tensor(index), torch.from_numpy(np.stack(arrays))) for m, (index, arrays) in groups.items()}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "media": media, "samples": len(samples)}


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one rank, from optimizer step ``start_step`` to ``steps``.

    Step ``s`` takes global positions ``[s*G, (s+1)*G)`` of an endless sequence of per-epoch permutations (seeded
    by ``seed`` and the epoch), so the order depends on nothing but the seed. Within a global batch samples are
    sorted by length and cut into micro-batches (length grouping: little padding); micro-batch ``j`` goes to rank
    ``j % world`` as its accumulation step ``j // world``.
    """

    def __init__(self, lengths: list[int], global_batch: int, micro_batch: int, world: int, rank: int, seed: int,
                 steps: int, start_step: int = 0):  # fmt: skip
        self.lengths = np.asarray(lengths)
        self.n = len(lengths)
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.world, self.rank = world, rank
        self.seed, self.steps, self.start_step = seed, steps, start_step
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        positions = range(step * self.global_batch, (step + 1) * self.global_batch)
        batch = np.array([self._perm(p // self.n)[p % self.n] for p in positions])
        batch = batch[np.argsort(-self.lengths[batch], kind="stable")]
        micro = [batch[i : i + self.micro_batch].tolist() for i in range(0, len(batch), self.micro_batch)]
        return micro[self.rank :: self.world]

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            yield from self.step_batches(step)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.global_batch // (self.micro_batch * self.world)
