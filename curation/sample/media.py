"""A media folder cut from a generated sample: each file with its caption beside it (``x.jpg`` + ``x.txt``), the
input the crawl stage reads without a network. Tests and benchmarks build their runs from such folders."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def media_folder(
    sample_dir: Path,
    out: Path,
    keep: Callable[[dict[str, Any]], bool] = lambda row: True,
    copies: int = 1,
    link: bool = False,
) -> Path:
    """Write the sample's files that exist on disk (URL-only defects have none) and for which ``keep(label_row)``
    holds into ``out``, ``copies`` times each (``name-0.jpg``, ``name-1.jpg``, ... when more than one), hard-linked
    when ``link`` else copied, each with its labelled caption beside it."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for row in pq.read_table(Path(sample_dir) / "labels.parquet").to_pylist():
        src = Path(sample_dir) / row["path"]
        if not src.is_file() or not keep(row):
            continue
        names = [src.name] if copies == 1 else [f"{src.stem}-{c}{src.suffix}" for c in range(copies)]
        for name in names:
            (os.link if link else shutil.copyfile)(src, out / name)
            (out / name).with_suffix(".txt").write_text(row["caption"])
    return out
