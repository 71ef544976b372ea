"""Caption perplexity under a causal language model: exp of the mean negative log-likelihood of the caption's
tokens (and its end-of-text token when the tokenizer adds one), given the beginning-of-text token."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from curation.scoring.base import Scorer, fill_rows, limit_threads, resolve_device


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
        positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", 1024
        )
        self.max_tokens = min(positions, 256)  # captions; a longer one is judged by its first 256 tokens
        self.batch_size = spec.batch_size

    def encode(self, captions: list[str]) -> list[list[int]]:
        """Token ids, each starting with the beginning-of-text token (GPT-2's tokenizer does not add one)."""
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer(captions, truncation=True, max_length=self.max_tokens)["input_ids"]
        if bos is not None:
            ids = [x if x and x[0] == bos else ([bos] + x)[: self.max_tokens] for x in ids]
        return ids

    def perplexities(self, ids: list[list[int]]) -> list[float | None]:
        import torch

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        target = mask[:, 1:].float()
        count = target.sum(1)
        nll = -(logp * target).sum(1) / count.clamp(min=1)
        return [float(p) if c > 0 else None for p, c in zip(nll.exp().cpu().tolist(), count.tolist())]

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Model batches of similar caption lengths (less padding), each from one crawl shard: padding changes a
        perplexity in its last float digits, so a shard's scores must not depend on which other shards shared the
        call (a resumed run scores a shard beside others than the first run did)."""
        captions = batch.column("caption").to_pylist()
        shards = batch.column("shard").to_pylist() if "shard" in batch.column_names else [""] * len(captions)
        todo = [i for i, c in enumerate(captions) if c and not c.isspace()]
        todo.sort(key=lambda i: (shards[i], len(captions[i]), i))
        chunks: list[list[int]] = []
        for i in todo:
            if not chunks or len(chunks[-1]) == self.batch_size or shards[chunks[-1][0]] != shards[i]:
                chunks.append([])
            chunks[-1].append(i)
        values: list[float | None] = []
        for chunk in chunks:
            values += self.perplexities(self.encode([captions[i] for i in chunk]))
        return fill_rows(batch, "perplexity", todo, values, pa.float64())
