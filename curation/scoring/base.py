"""What every scorer shares: the ledger columns it adds, device and precision choice, and column updates on the
pyarrow batches that flow through Ray Data.

A scorer is a class that Ray Data runs as an actor pool (``map_batches(Scorer, concurrency=...)``): ``__init__``
loads its model once per actor, ``__call__`` scores one batch (a ``pyarrow.Table``) and returns it with its columns
filled in. Rows a scorer does not handle (another modality, undecodable media) pass through untouched.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

log = logging.getLogger("curation")

# ledger columns of the media-text scorers (one column for every modality: CLIP for images and video frames, CLAP
# for audio, so one recipe key covers all three, with per-modality thresholds)
MEDIA_SCHEMA = pa.schema([("clip_score", pa.float64())])
EMBEDDING_TYPE = pa.list_(pa.float32())


class Scorer:
    """Base class of the scorers; ``schema`` lists the ledger columns it fills."""

    name: ClassVar[str] = ""
    schema: ClassVar[pa.Schema] = pa.schema([])

    def __call__(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError


class MediaTextScorer(Scorer):
    """A media-text similarity scorer: fills ``clip_score`` and ``embedding`` for the rows of its ``modalities``
    from their decoded inputs, ``batch_size`` rows per forward. Subclasses load their model in ``__init__`` (and
    set ``batch_size`` and ``drop_inputs``: remove the decoded inputs afterwards, when no later scorer needs them)
    and implement :meth:`score`."""

    schema = MEDIA_SCHEMA
    modalities: ClassVar[tuple[str, ...]] = ()
    batch_size: int = 32
    drop_inputs: bool = False

    def score(self, arrays: list[np.ndarray], captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, L2-normalised media embeddings) for decoded inputs and their captions."""
        raise NotImplementedError

    def text_inputs(self, batch: pa.Table, rows: dict[str, list], todo: list[int]) -> Any:
        """The text side of the rows at ``todo``, sliceable like a list and passed to :meth:`score`: their
        captions, a missing one as empty (a scorer may give tokens a task made instead)."""
        return [rows["caption"][i] or "" for i in todo]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from curation.scoring.decode import INPUT_COLUMNS, media_rows, row_inputs

        todo, rows = media_rows(batch, self.modalities)
        inputs, texts = row_inputs(batch, rows, todo), self.text_inputs(batch, rows, todo)
        scores: list[np.ndarray] = []
        embeddings: list[np.ndarray] = []
        for start in range(0, len(todo), self.batch_size):
            end = start + self.batch_size
            sims, embs = self.score(inputs[start:end], texts[start:end])
            scores.append(np.asarray(sims, dtype=np.float64))
            embeddings.append(np.asarray(embs, dtype=np.float32))
        if todo:  # whole columns from the arrays: no Python float per value
            batch = fill_rows(batch, "clip_score", todo, pa.array(np.concatenate(scores)), pa.float64())
            batch = fill_rows(batch, "embedding", todo, list_array(np.concatenate(embeddings)), EMBEDDING_TYPE)
        return batch.drop_columns(list(INPUT_COLUMNS)) if self.drop_inputs else batch


def list_array(rows: np.ndarray) -> pa.Array:
    """A 2-D array as a ``list<float32>`` column, one list per row, built from its buffer without a copy per row."""
    n, dim = rows.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1)))


def resolve_device(spec: Any, has_gpu: bool) -> tuple[str, str]:
    """(device, precision) for a ``ScoreConfig.Model`` inside an actor: a GPU when the actor was given one and the
    spec allows it, in fp16 unless the spec says otherwise; fp32 on CPU."""
    import torch

    want_gpu = spec.device != "cpu" and has_gpu and torch.cuda.is_available()
    device = (spec.device if spec.device.startswith("cuda") else "cuda") if want_gpu else "cpu"
    if spec.precision != "auto":
        precision = spec.precision if device != "cpu" or spec.precision != "fp16" else "fp32"
    else:
        precision = "fp16" if device != "cpu" else "fp32"
    return device, precision


def limit_threads(num_cpus: float | None) -> None:
    """Give torch as many threads as CPUs the actor reserved (at least one; ``None``, the default reservation:
    one): several model actors share a small machine, and oversubscribed math threads slow every one of them down
    many times over."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus or 1)))


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace (or append) column ``name``."""
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(name, values)
    return table.set_column(i, name, values)


def fill_rows(
    table: pa.Table, name: str, rows: list[int], values: list[Any] | pa.Array, type_: pa.DataType
) -> pa.Table:
    """Set column ``name`` at the row positions ``rows`` (increasing; other rows keep their value, or null)."""
    import pyarrow.compute as pc

    values = values if isinstance(values, pa.Array) else pa.array(values, type_)
    if values.type != type_:
        values = values.cast(type_)
    n = table.num_rows
    if len(rows) == n:  # every row (the positions increase): no merge
        return set_column(table, name, values)
    where = np.full(n, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    placed = values.take(pa.array(where, mask=where < 0))
    if name in table.column_names:
        current = table.column(name).combine_chunks()
        placed = pc.if_else(pa.array(where >= 0), placed, current.cast(type_) if current.type != type_ else current)
    return set_column(table, name, placed)
