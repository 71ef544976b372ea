"""Caption perplexity under a causal language model: exp of the mean negative log-likelihood of the caption's
tokens (and its end-of-text token when the tokenizer adds one), given the beginning-of-text token.

Tokenizing is not the model actor's work: :class:`LmTokens` (the LM's own fast tokenizer, run by the
``tokenizers`` library alone, no torch or transformers) adds the ids as a column in the tasks before the actors,
on the cores the actor does not use (:func:`add_lm_ids`), and the actor only pads them and runs the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation.scoring.base import Scorer, fill_rows, limit_threads, resolve_device

IDS_COLUMN = "lm_ids"  # token ids a task added before the actor (dropped by the actor)
MAX_TOKENS = 256  # captions; a longer one is judged by its first 256 tokens


def max_tokens(model_config: Any) -> int:
    """Tokens of a caption the model scores: its context, at most :data:`MAX_TOKENS`."""
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", 1024)
    return min(positions, MAX_TOKENS)


@dataclass
class LmTokens:
    """The LM tokenizer as the scorer uses it: the Rust tokenizer's JSON (padding off, truncation at
    ``max_tokens``), and the beginning-of-text id put first when the tokenizer does not add it (GPT-2's)."""

    tokenizer_json: str
    bos: int | None
    max_tokens: int
    _tok: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, tokenizer: Any, max_tokens: int) -> LmTokens | None:
        """From a transformers tokenizer; ``None`` when it has no Rust backend (a slow tokenizer)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return cls(backend.to_str(), tokenizer.bos_token_id, max_tokens) if backend is not None else None

    @classmethod
    def for_model(cls, spec: Any) -> LmTokens | None:
        """For the ``score.perplexity`` model ``spec``, from its tokenizer and config files (no weights loaded)."""
        from transformers import AutoConfig, AutoTokenizer

        from curation.models.hf import resolve_hf

        source = resolve_hf(spec, "lm")
        return cls.of(AutoTokenizer.from_pretrained(source), max_tokens(AutoConfig.from_pretrained(source)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}

    def encode(self, captions: list[str]) -> list[list[int]]:
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_str(self.tokenizer_json)
            self._tok.no_padding()
            self._tok.enable_truncation(self.max_tokens)
        return with_bos([e.ids for e in self._tok.encode_batch_fast(captions)], self.bos, self.max_tokens)


def with_bos(ids: list[list[int]], bos: int | None, max_tokens: int) -> list[list[int]]:
    """Each id list starting with the beginning-of-text id (GPT-2's tokenizer does not add one), still at most
    ``max_tokens`` long."""
    if bos is None:
        return ids
    return [x if x and x[0] == bos else ([bos] + x)[:max_tokens] for x in ids]


def add_lm_ids(batch: pa.Table, tokens: LmTokens) -> pa.Table:
    """Ray Data batch function: the LM's token ids of every caption, as a ``list<int32>`` column."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core, as the task reserved: the actor has its own
    ids = tokens.encode([c or "" for c in batch.column("caption").to_pylist()])
    return batch.append_column(IDS_COLUMN, pa.array(ids, pa.list_(pa.int32())))


def flat_ids(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list of id lists, as a ``list<int32>`` column's buffers."""
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((i for x in ids for i in x), np.int64, int(offsets[-1]))
    return values, offsets


def padded(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of shape (rows, longest), right-padded with ``pad``: row r is
    ``values[starts[r] : starts[r] + lengths[r]]``. One gather, no loop over rows."""
    width = int(lengths.max()) if len(lengths) else 0
    mask = np.arange(width) < lengths[:, None]
    where = np.where(mask, starts[:, None] + np.arange(width), 0)
    ids = np.where(mask, values[where] if len(values) else pad, pad)
    return ids.astype(np.int64), mask.astype(np.int64)


class PerplexityScorer(Scorer):
    """Fills ``perplexity`` for every row with a non-empty caption.

    Args:
        spec: the ``score.perplexity`` model (``ScoreConfig.Model``).
        has_gpu: whether Ray gave this actor a GPU.
    """

    name = "perplexity"
    schema = pa.schema([("perplexity", pa.float64())])

    def __init__(self, spec: Any, has_gpu: bool = False):
        from curation.models.hf import load_causal_lm

        limit_threads(spec.num_cpus)
        self.device, precision = resolve_device(spec, has_gpu)
        self.model, self.tokenizer = load_causal_lm(spec, self.device, precision)
        self.max_tokens = max_tokens(self.model.config)
        self.tokens = LmTokens.of(self.tokenizer, self.max_tokens)
        self.pad = self.tokenizer.pad_token_id or 0
        self.batch_size = spec.batch_size

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids, each starting with the beginning-of-text token (GPT-2's tokenizer does not add one)."""
        if self.tokens is not None:
            return self.tokens.encode(captions)
        ids = self.tokenizer(captions, truncation=True, max_length=self.max_tokens)["input_ids"]
        return with_bos(ids, self.tokenizer.bos_token_id, self.max_tokens)

    def perplexities(self, ids: list[list[int]]) -> list[float | None]:
        """Perplexity of each id sequence (``None`` for one with nothing after its first token)."""
        values, offsets = flat_ids(ids)
        return self._perplexities(*padded(values, offsets[:-1], np.diff(offsets), self.pad))

    def _perplexities(self, ids: np.ndarray, mask: np.ndarray) -> list[float | None]:
        import torch

        from curation.scoring.decode import to_device

        input_ids, mask_t = to_device(ids, self.device), to_device(mask, self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask_t).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
            target = mask_t[:, 1:].float()
            count = target.sum(1)
            nll = -(logp * target).sum(1) / count.clamp(min=1)
        return [float(p) if c > 0 else None for p, c in zip(nll.exp().cpu().tolist(), count.tolist())]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Model batches of similar token counts (less padding), each from one crawl shard: padding changes a
        perplexity in its last float digits, so a shard's scores must not depend on which other shards shared the
        call (a resumed run scores a shard beside others than the first run did). Token ids come from the
        :data:`IDS_COLUMN` a task added, or, without it, from tokenizing here."""
        captions = batch.column("caption").to_pylist()
        shards = batch.column("shard").to_pylist() if "shard" in batch.column_names else [""] * len(captions)
        todo = [i for i, c in enumerate(captions) if c and not c.isspace()]
        if IDS_COLUMN in batch.column_names:
            column = batch.column(IDS_COLUMN).combine_chunks()
            values = column.values.to_numpy(zero_copy_only=False)
            offsets = column.offsets.to_numpy()
            starts, lengths = offsets[:-1][todo], np.diff(offsets)[todo]
            batch = batch.drop_columns([IDS_COLUMN])
        else:
            values, offsets = flat_ids(self.encode([captions[i] for i in todo]))
            starts, lengths = offsets[:-1], np.diff(offsets)
        order = sorted(range(len(todo)), key=lambda k: (shards[todo[k]], lengths[k], todo[k]))
        chunks: list[list[int]] = []
        for k in order:
            if not chunks or len(chunks[-1]) == self.batch_size or shards[todo[chunks[-1][0]]] != shards[todo[k]]:
                chunks.append([])
            chunks[-1].append(k)
        values_at: dict[int, float | None] = {}
        for chunk in chunks:
            got = self._perplexities(*padded(values, starts[chunk], lengths[chunk], self.pad))
            values_at.update(zip(chunk, got))
        return fill_rows(batch, "perplexity", todo, [values_at[k] for k in range(len(todo))], pa.float64())
