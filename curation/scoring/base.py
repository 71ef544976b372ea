"""What every scorer shares: the ledger columns it adds, device and precision choice, and column updates on the
pyarrow batches that flow through Ray Data.

A scorer is a class that Ray Data runs as an actor pool (``map_batches(Scorer, concurrency=...)``): ``__init__``
loads its model once per actor, ``__call__`` scores one batch (a ``pyarrow.Table``) and returns it with its columns
filled in. Rows a scorer does not handle (another modality, undecodable media) pass through untouched.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

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


def limit_threads(num_cpus: float) -> None:
    """Give torch as many threads as CPUs the actor reserved (at least one): several model actors share a small
    machine, and oversubscribed math threads slow every one of them down many times over."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace (or append) column ``name``."""
    i = table.schema.get_field_index(name)
    if i < 0:
        return table.append_column(name, values)
    return table.set_column(i, name, values)


def fill_rows(table: pa.Table, name: str, rows: list[int], values: list[Any], type_: pa.DataType) -> pa.Table:
    """Set column ``name`` at the row positions ``rows`` (other rows keep their value, or null)."""
    current = table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
    for i, v in zip(rows, values):
        current[i] = v
    return set_column(table, name, pa.array(current, type_))
