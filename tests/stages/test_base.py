"""The stage base: Ray tasks a shard (map_shards) and the Arrow tables handed to them."""

from __future__ import annotations

import pyarrow as pa
import pytest

from curation.stages.base import ipc_bytes, map_shards, read_ipc


@pytest.mark.quick
def test_tables_travel_as_ipc_bytes():
    table = pa.table({"uid": ["a", "b"], "score": [0.5, None]})
    assert read_ipc(ipc_bytes(table)).equals(table)
    assert ipc_bytes(None) == b"" and read_ipc(b"") is None


@pytest.mark.slow
def test_map_shards_runs_every_item_once(ray_session):
    def _rows(name: str, table: bytes, scale: int) -> dict:  # local: Ray's workers cannot import the test module
        t = read_ipc(table)
        return {"name": name, "rows": None if t is None else t.num_rows * scale}

    # no table anywhere: a column of Nones among the items would reach the tasks as NaN
    items = [{"name": f"s{i}", "table": ipc_bytes(None)} for i in range(3)]
    items.append({"name": "t", "table": ipc_bytes(pa.table({"x": [1, 2, 3]}))})
    summaries = list(map_shards(_rows, items, num_cpus=0.5, parallelism=2, scale=10))
    assert sorted((s["name"], s["rows"]) for s in summaries) == [("s0", None), ("s1", None), ("s2", None), ("t", 30)]
    assert list(map_shards(_rows, [], num_cpus=1.0)) == []
