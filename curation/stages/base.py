"""The one stage contract.

A stage reads the records its predecessor kept, writes its own output under ``RUN_DIR/<stage>/``, and accounts
for every record it was given in ledger parts (``RUN_DIR/<stage>/ledger/*.parquet``): kept, or rejected with a
reason. Work is split into shards; a shard's outputs are written to temporary names and renamed, then a small
``done/<shard>.json`` marker is written last, so a killed run leaves either a finished shard or nothing that
counts. The runner writes ``RUN_DIR/<stage>/_SUCCESS.json`` when the whole stage is complete.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from curation.config import PipelineConfig

if TYPE_CHECKING:
    import pyarrow as pa
from curation.fsutil import atomic_path, read_json, write_json  # noqa: F401  (re-exported for stages)

log = logging.getLogger("curation")


# stages that may do a shard's work in Ray tasks do fewer records than this on the driver: a task's worker first
# imports the package, and maybe a tokenizer (seconds); the demo's 355 records, pre-tokenized, formatted in 2.3 s
# on the driver and 8.7 s as tasks
TASKS_FROM_RECORDS = 10_000


def map_shards(
    fn: Callable[..., dict[str, Any]],
    items: list[dict[str, Any]],
    num_cpus: float,
    parallelism: int | None = None,
    **kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """Run ``fn(**item, **kwargs)`` for every item, one Ray task an item, and yield each summary ``fn`` returns
    (a JSON-able dict) as its task finishes.

    Args:
        fn: the work of one shard; it writes its own outputs and done marker, so a killed run keeps what finished.
        items: one dict of plain values (str, bytes, numbers) a task, never None: Ray Data turns a column of Nones
            into NaN.
        num_cpus: CPUs a task reserves in Ray.
        parallelism: tasks at once; ``None``: the cluster's CPUs / ``num_cpus``.
        kwargs: passed to every call (pickled once into the task function).
    """
    import ray

    if not items:
        return
    if parallelism is None:
        parallelism = max(1, int(int(ray.cluster_resources().get("CPU", 1)) / num_cpus))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _run_items,
        fn_kwargs={"fn": fn, "kwargs": kwargs},
        batch_size=1,
        num_cpus=num_cpus,
        compute=ray.data.TaskPoolStrategy(size=min(parallelism, len(items))),
    )
    for row in ds.iter_rows():
        yield json.loads(row["summary"])


def ipc_bytes(table: pa.Table | None) -> bytes:
    """A table as an Arrow IPC stream, to hand to a Ray task as a plain value; None as no bytes (a column of
    Nones in :func:`map_shards`'s items would reach the tasks as NaN)."""
    import pyarrow as pa

    if table is None:
        return b""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_ipc(data: bytes) -> pa.Table | None:
    """The table :func:`ipc_bytes` wrote (None for no bytes)."""
    import pyarrow as pa

    return pa.ipc.open_stream(data).read_all() if data else None


def read_kept(run_dir: str | Path, shard: str, uids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The records of crawl shard ``shard`` whose uid is in ``uids``, in shard order: the same table as that shard's
    entry of :meth:`Stage.kept_records` when ``uids`` are its uids. Tasks read their own shard with it, so that the
    driver holds and sends only the uids."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(Path(run_dir) / "crawl" / "shards" / f"{shard}.parquet")
    return table.filter(pc.is_in(table.column("uid"), value_set=uids))


def _run_items(batch: dict[str, Any], fn: Callable[..., dict[str, Any]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Ray Data batch function of :func:`map_shards`: ``fn`` over each row of ``batch``."""
    keys = list(batch)
    out = []
    for i in range(len(batch[keys[0]])):
        item = {k: batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i] for k in keys}
        out.append(json.dumps(fn(**item, **kwargs)))
    return {"summary": out}


@dataclass
class StageContext:
    """What a stage needs to know about the run it is part of."""

    run_dir: Path
    config: PipelineConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name


class Stage:
    """Base class of every pipeline stage.

    Subclasses set ``name`` (the stage's key in ``stages:`` and its folder), ``order`` (its place in the data
    flow), ``config_sections`` (the config sections whose change makes a completed stage stale) and ``help``,
    and implement :meth:`run`, which returns a summary dict with at least ``input``, ``kept`` and ``rejected``.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    config_sections: ClassVar[tuple[str, ...]] = ()
    help: ClassVar[str] = ""
    needs_ray: ClassVar[bool] = True  # False: runs in the driver alone, so a run of only such stages starts no Ray
    # keys of the stage's config sections that set where and how fast it runs, not what it writes: changing them
    # does not make a completed stage stale
    execution_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.config = ctx.config
        self.dir = ctx.stage_dir(self.name)

    def run(self, input_stage: str) -> dict[str, Any]:
        """Process the records kept by ``input_stage``; write outputs, ledger parts and shard markers."""
        raise NotImplementedError

    # -- shard bookkeeping shared by all stages -------------------------------------------------------------
    def done_path(self, shard: str) -> Path:
        return self.dir / "done" / f"{shard}.json"

    def is_shard_done(self, shard: str) -> bool:
        return self.done_path(shard).is_file()

    def mark_shard_done(self, shard: str, summary: dict[str, Any]) -> None:
        write_json(self.done_path(shard), {**summary, "shard": shard, "finished": time.time()})

    def ledger_path(self, shard: str) -> Path:
        return self.dir / "ledger" / f"{shard}.parquet"

    @property
    def success_path(self) -> Path:
        return self.dir / "_SUCCESS.json"

    # -- reading what earlier stages kept -----------------------------------------------------------------
    def kept_records(self, columns: list[str] | None = None) -> dict[str, pa.Table]:
        """The crawled records (schemas/record.schema.json) that every completed stage so far has kept, by crawl
        shard; only ``columns`` of them (``uid`` always) when given, so a stage that needs few keeps little on
        the driver. Media bytes stay in the crawl shards; read them with :meth:`read_media`."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        ledger = pq.read_table(self.ctx.run_dir / "ledger.parquet", columns=["uid", "status"])
        kept = ledger.filter(pc.equal(ledger.column("status"), "kept")).column("uid")
        wanted = None if columns is None else ["uid", *(c for c in columns if c != "uid")]
        paths = sorted((self.ctx.run_dir / "crawl" / "shards").glob("*.parquet"))
        shards = {p.stem: pq.read_table(p, columns=wanted) for p in paths}
        if not shards:
            return {}
        # one lookup over every shard's uids: each ``is_in`` builds a hash table of the kept uids, which per shard
        # took 16 s of a million-record re-filter (100 shards)
        uids = [t.column("uid") for t in shards.values()]
        keep = pc.is_in(pa.chunked_array([c for u in uids for c in u.chunks], uids[0].type), value_set=kept)
        out, start = {}, 0
        for shard, table in shards.items():
            out[shard] = table.filter(keep.slice(start, table.num_rows))
            start += table.num_rows
        return out

    def read_media(self, shard: str) -> dict[str, bytes]:
        """uid -> media bytes of one crawl shard (one sequential pass over the tar)."""
        import tarfile

        media = {}
        with tarfile.open(self.ctx.run_dir / "crawl" / "shards" / f"{shard}.tar") as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                if ext not in ("txt", "json"):
                    media[key] = tf.extractfile(member).read()
        return media

    def fingerprint(self) -> str:
        return self.config.section_fingerprint("input", *self.config_sections, exclude=self.execution_keys)
