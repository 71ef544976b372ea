"""Helpers for stage tests on the embedded sample crawled from its loopback server: run the demo pipeline cut to
some stages, and join the run's ledger back to the sample's ids."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from curation.config import load_config
from curation.runner import Run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo.yaml"


def run_demo(out: Path, input_path, stages: list[str], *overrides: str) -> dict:
    """Run pipelines/demo.yaml's settings with only ``stages`` on ``input_path`` into ``out``; returns run.json."""
    config = load_config(DEMO, [f"input.path={input_path}", f"stages=[{','.join(stages)}]", *overrides])
    return Run(config, out).run()


def ledger_by_id(run_dir: Path, url_list: Path) -> dict[str, dict]:
    """Ledger rows by sample id: row i of the parquet URL list is the ledger's source ``<list name>:i``."""
    ids = pq.read_table(url_list).column("id").to_pylist()
    by_source = {row["source"]: row for row in pq.read_table(run_dir / "ledger.parquet").to_pylist()}
    return {sample_id: by_source[f"{url_list.name}:{i}"] for i, sample_id in enumerate(ids)}
