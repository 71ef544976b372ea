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


@pytest.mark.quick
def test_read_kept_gives_a_shard_of_kept_records(tmp_path):
    """What a task reads for its shard is that shard's entry of kept_records(): the same rows, order and columns."""
    import pyarrow.parquet as pq

    from curation.config import load_config
    from curation.stages.base import Stage, StageContext, read_kept

    shards = tmp_path / "crawl" / "shards"
    shards.mkdir(parents=True)
    status = {}
    for s, uids in (("00000", ["c", "a", "e", "b"]), ("00001", ["f", "d", "g"])):
        pq.write_table(pa.table({"uid": uids, "caption": [f"caption of {u}" for u in uids],
                                 "num_bytes": list(range(len(uids)))}), shards / f"{s}.parquet")  # fmt: skip
        status.update({u: "rejected" if u in ("a", "g") else "kept" for u in uids})
    pq.write_table(pa.table({"uid": list(status), "status": list(status.values())}), tmp_path / "ledger.parquet")
    stage = Stage(StageContext(tmp_path, load_config(data={"name": "t", "stages": ["crawl"]})))
    kept = stage.kept_records()
    uids = stage.kept_records(columns=["uid"])
    assert {s: t.column("uid").to_pylist() for s, t in uids.items()} == {"00000": ["c", "e", "b"], "00001": ["f", "d"]}
    for shard, table in kept.items():
        assert read_kept(tmp_path, shard, uids[shard].column("uid")).equals(table)
