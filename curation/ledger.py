"""The ledger: one row per input record, kept or rejected, with the stage and reason of a reject.

Stages write ledger *parts* (``RUN_DIR/<stage>/ledger/*.parquet``) for exactly the records they were given;
:func:`assemble_ledger` joins them onto the input records into ``RUN_DIR/ledger.parquet`` and checks the promise
that nothing is lost: every input uid appears once, and input = kept + rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.fsutil import atomic_path

PART_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("status", pa.string()),  # "kept" | "rejected"
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("dup_of", pa.string()),
    ]
)
BASE_COLUMNS = ("uid", "modality", "source", "url", "status", "stage", "reason", "detail", "dup_of")


class LedgerError(RuntimeError):
    """A stage lost or invented records: always a bug, never bad input."""


def write_part(path: Path, rows: list[dict[str, Any]] | pa.Table, extra_schema: pa.Schema | None = None) -> None:
    """Write one ledger part. ``rows`` (dicts, or a table built column-wise) carry the :data:`PART_SCHEMA` fields
    and optionally the score columns of ``extra_schema``."""
    schema = PART_SCHEMA
    for f in extra_schema or []:
        schema = schema.append(f)
    if isinstance(rows, pa.Table):
        table = rows.select(schema.names).cast(schema)
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def kept_row(uid: str, stage: str, **scores: Any) -> dict[str, Any]:
    return {"uid": uid, "status": "kept", "stage": stage, "reason": None, "detail": None, "dup_of": None, **scores}


def rejected_row(
    uid: str, stage: str, reason: str, detail: str | None = None, dup_of: str | None = None, **scores: Any
) -> dict[str, Any]:
    return {
        "uid": uid,
        "status": "rejected",
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "dup_of": dup_of,
        **scores,
    }


def read_parts(folder: Path) -> pa.Table | None:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")


def assemble_ledger(run_dir: Path, stages: list[str]) -> dict[str, int]:
    """Build ``ledger.parquet`` from the input records and the ledger parts of the completed ``stages``
    (in pipeline order).

    A record's status is that of the first stage that rejected it; score columns of every stage are joined on.
    Returns counts. Raises :class:`LedgerError` when a stage's ledger does not match the records it was given.
    """
    records = read_parts(run_dir / "input" / "records")
    if records is None:
        raise LedgerError(f"{run_dir}: no input records; was the run started?")
    n = records.num_rows
    uids = records.column("uid").to_pylist()
    if len(set(uids)) != n:
        raise LedgerError(f"{run_dir}: input uids are not unique")
    index = {u: i for i, u in enumerate(uids)}
    status: list[str | None] = [None] * n
    stage_col: list[str | None] = [None] * n
    reason: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    dup_of: list[str | None] = [None] * n
    extra: dict[str, tuple[pa.DataType, list[Any]]] = {}

    def apply(part: pa.Table, stage: str) -> None:
        cols = part.to_pydict()
        seen = set()
        for i, uid in enumerate(cols["uid"]):
            j = index.get(uid)
            if j is None:
                raise LedgerError(f"stage {stage}: ledger names uid {uid} that is not an input record")
            if uid in seen:
                raise LedgerError(f"stage {stage}: uid {uid} appears twice in its ledger")
            seen.add(uid)
            if status[j] == "rejected":
                raise LedgerError(f"stage {stage}: uid {uid} was already rejected by {stage_col[j]}")
            status[j] = cols["status"][i]
            stage_col[j] = stage
            if cols["status"][i] == "rejected":
                reason[j], detail[j], dup_of[j] = cols["reason"][i], cols["detail"][i], cols["dup_of"][i]
        for name in part.column_names:
            if name in PART_SCHEMA.names:
                continue
            dtype, values = extra.setdefault(name, (part.schema.field(name).type, [None] * n))
            for i, uid in enumerate(cols["uid"]):
                values[index[uid]] = cols[name][i]
        return seen

    counts: dict[str, int] = {"input": n}
    input_part = read_parts(run_dir / "input" / "ledger")
    if input_part is not None:
        apply(input_part, "input")
    expected = {u for u in uids if status[index[u]] != "rejected"}
    for stage in stages:
        part = read_parts(run_dir / stage / "ledger")
        if part is None:
            raise LedgerError(f"stage {stage}: no ledger parts; only completed stages can be assembled")
        seen = apply(part, stage)
        if seen != expected:
            missing = len(expected - seen)
            raise LedgerError(
                f"stage {stage}: its ledger accounts for {len(seen)} records but it was given "
                f"{len(expected)} ({missing} missing)"
            )
        expected = {u for u in expected if status[index[u]] != "rejected"}
    # records that passed every completed stage are kept
    status = [s if s is not None else "kept" for s in status]
    table = pa.table(
        {
            "uid": records.column("uid"),
            "modality": records.column("modality"),
            "source": records.column("source"),
            "url": records.column("url"),
            "status": pa.array(status, pa.string()),
            "stage": pa.array(stage_col, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "detail": pa.array(detail, pa.string()),
            "dup_of": pa.array(dup_of, pa.string()),
            **{name: pa.array(values, dtype) for name, (dtype, values) in extra.items()},
        }
    )
    # a kept record's stage is where it was last seen; only rejects name a stage in the contract
    table = table.set_column(
        table.schema.get_field_index("stage"),
        "stage",
        pc.if_else(pc.equal(table.column("status"), "rejected"), table.column("stage"), pa.scalar(None, pa.string())),
    )
    with atomic_path(run_dir / "ledger.parquet") as tmp:
        pq.write_table(table, tmp)
    counts["kept"] = status.count("kept")
    counts["rejected"] = status.count("rejected")
    if counts["kept"] + counts["rejected"] != n:
        raise LedgerError("ledger counts do not add up")
    return counts
