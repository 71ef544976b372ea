"""The ledger's promise: every input record once, kept or rejected; a stage that loses or invents one is a bug."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.inputs import INPUT_SCHEMA
from curation.ledger import LedgerError, assemble_ledger, kept_row, rejected_row, write_part
from curation.schemas import validate

pytestmark = pytest.mark.quick


def make_run(tmp_path, n=5):
    rows = [
        {"uid": f"{i:016x}", "source": f"urls.parquet:{i}", "modality": "image", "url": f"http://h/{i}.jpg",
         "local_path": None, "tar_member": None, "caption": "c", "input_error": None, "input_detail": None}
        for i in range(n)
    ]  # fmt: skip
    (tmp_path / "input" / "records").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=INPUT_SCHEMA), tmp_path / "input" / "records" / "00000.parquet")
    write_part(
        tmp_path / "input" / "ledger" / "input.parquet", [rejected_row(rows[0]["uid"], "input", "missing_caption", "x")]
    )
    return [r["uid"] for r in rows]


def test_first_reject_wins_and_counts_add_up(tmp_path):
    uids = make_run(tmp_path)
    write_part(tmp_path / "crawl" / "ledger" / "0.parquet",
               [kept_row(uids[1], "crawl"), rejected_row(uids[2], "crawl", "http_404", "http://h/2.jpg: HTTP 404"),
                kept_row(uids[3], "crawl"), kept_row(uids[4], "crawl")])  # fmt: skip
    write_part(tmp_path / "score" / "ledger" / "0.parquet",
               [kept_row(uids[1], "score", clip=0.3), rejected_row(uids[3], "score", "low_clip", "0.1", clip=0.1),
                kept_row(uids[4], "score", clip=0.5)],
               extra_schema=pa.schema([("clip", pa.float64())]))  # fmt: skip
    counts = assemble_ledger(tmp_path, ["crawl", "score"])
    assert counts == {"input": 5, "kept": 2, "rejected": 3}
    table = pq.read_table(tmp_path / "ledger.parquet").to_pylist()
    by = {r["uid"]: r for r in table}
    assert (by[uids[0]]["stage"], by[uids[0]]["reason"]) == ("input", "missing_caption")
    assert (by[uids[2]]["stage"], by[uids[2]]["reason"]) == ("crawl", "http_404")
    assert (by[uids[3]]["stage"], by[uids[3]]["clip"]) == ("score", 0.1)
    assert by[uids[1]]["status"] == "kept" and by[uids[1]]["stage"] is None and by[uids[1]]["clip"] == 0.3
    for row in table:
        validate("ledger_row", row)


def test_a_stage_that_drops_a_record_is_caught(tmp_path):
    uids = make_run(tmp_path)
    write_part(tmp_path / "crawl" / "ledger" / "0.parquet", [kept_row(u, "crawl") for u in uids[1:4]])
    with pytest.raises(LedgerError, match="1 missing"):
        assemble_ledger(tmp_path, ["crawl"])


def test_a_stage_that_invents_or_repeats_a_record_is_caught(tmp_path):
    uids = make_run(tmp_path)
    write_part(
        tmp_path / "crawl" / "ledger" / "0.parquet",
        [kept_row(u, "crawl") for u in uids[1:]] + [kept_row("f" * 16, "crawl")],
    )
    with pytest.raises(LedgerError, match="not an input record"):
        assemble_ledger(tmp_path, ["crawl"])
    write_part(
        tmp_path / "crawl" / "ledger" / "0.parquet",
        [kept_row(u, "crawl") for u in uids[1:]] + [kept_row(uids[1], "crawl")],
    )
    with pytest.raises(LedgerError, match="twice"):
        assemble_ledger(tmp_path, ["crawl"])


def test_a_stage_may_not_revive_a_rejected_record(tmp_path):
    uids = make_run(tmp_path)
    write_part(tmp_path / "crawl" / "ledger" / "0.parquet", [kept_row(u, "crawl") for u in uids])
    with pytest.raises(LedgerError, match="already rejected"):
        assemble_ledger(tmp_path, ["crawl"])
