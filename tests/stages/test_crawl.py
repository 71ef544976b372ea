"""The crawl stage end to end on the embedded sample: every URL accounted for, with the right reasons."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sample_runs import DEMO, ROOT, ledger_by_id, run_demo

from curation.schemas import validate

pytestmark = pytest.mark.slow


def run_crawl(out: Path, input_path, *overrides: str) -> dict:
    return run_demo(out, input_path, ["crawl"], *overrides)


@pytest.fixture(scope="module")
def crawled(tmp_path_factory, sample_server, ray_session):
    out = tmp_path_factory.mktemp("run") / "crawl"
    state = run_crawl(out, sample_server.url_lists["parquet"])
    return out, state


def test_ledger_accounts_for_every_sample_url_with_the_right_reason(crawled, labels, sample_server):
    run_dir, state = crawled
    ledger = ledger_by_id(run_dir, sample_server.url_lists["parquet"])
    assert len(ledger) == len(labels)
    counts = state["counts"]
    assert counts["input"] == len(labels) == counts["kept"] + counts["rejected"]
    wrong = []
    for label in labels:
        row = ledger[label["id"]]
        expected = label["expected_crawl_reason"]
        got = row["reason"] if row["status"] == "rejected" else None
        if got != expected:
            wrong.append((label["id"], label["defect"], expected, got, row["detail"]))
    assert not wrong, f"{len(wrong)} records with the wrong crawl outcome, e.g. {wrong[:5]}"
    # every defect kind that the crawl must catch was present and caught
    caught = {label["defect"] for label in labels if label["expected_crawl_reason"]}
    assert caught >= {"dead_url", "slow_url", "corrupt_file", "truncated_file", "oversized_file"}
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["stages"]["crawl"]["status"] == "complete"
    assert run_json["counts"]["input"] == len(labels)


def test_rejects_name_the_url_and_validate(crawled):
    run_dir, _ = crawled
    for row in pq.read_table(run_dir / "ledger.parquet").to_pylist():
        validate("ledger_row", row)
        if row["status"] == "rejected":
            assert row["url"] and row["url"] in row["detail"]


def test_shards_hold_every_kept_record_with_valid_metadata(crawled, sample_dir, labels):
    run_dir, state = crawled
    kept = {r["uid"] for r in pq.read_table(run_dir / "ledger.parquet").to_pylist() if r["status"] == "kept"}
    seen = set()
    for tar_path in sorted((run_dir / "crawl" / "shards").glob("*.tar")):
        records = {r["uid"]: r for r in pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()}
        with tarfile.open(tar_path) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for uid, record in records.items():
            validate("record", record)
            data = members[f"{uid}.{record['ext']}"]
            assert hashlib.sha256(data).hexdigest() == record["sha256"]
            assert members[f"{uid}.txt"].decode() == record["caption"]
            assert json.loads(members[f"{uid}.json"]) == record
            assert "." not in uid
        seen |= set(records)
    assert seen == kept
    by_modality = {
        m: sum(1 for r in labels if r["modality"] == m and not r["expected_crawl_reason"])
        for m in ("image", "video", "audio")
    }
    assert all(n > 0 for n in by_modality.values())


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_csv_and_jsonl_url_lists_give_the_same_outcome(fmt, crawled, sample_server, tmp_path):
    run_dir, state = crawled
    other = run_crawl(tmp_path / fmt, sample_server.url_lists[fmt])
    assert other["counts"] == state["counts"]
    reasons = lambda d: json.loads((d / "run.json").read_text())["stages"]["crawl"]["summary"]["reasons"]  # noqa: E731
    assert reasons(tmp_path / fmt) == reasons(run_dir)


def test_img2dataset_output_folder_as_input(sample_server, labels, tmp_path, ray_session):
    """A folder written by img2dataset itself is read back as input, sample for sample."""
    import img2dataset
    import pyarrow as pa

    clean = [r for r in labels if r["modality"] == "image" and r["defect"] is None][:20]
    urls = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table(
            {"url": [f"{sample_server.base_url}/{r['path']}" for r in clean], "caption": [r["caption"] for r in clean]}
        ),
        urls,
    )
    i2d_out = tmp_path / "i2d"
    img2dataset.download(
        url_list=str(urls),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(i2d_out),
        processes_count=1,
        thread_count=4,
        resize_mode="no",
        number_sample_per_shard=8,
        distributor="multiprocessing",
        timeout=5,
    )
    state = run_crawl(tmp_path / "run", i2d_out)
    assert state["counts"] == {"input": 20, "kept": 20, "rejected": 0}
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    assert all(r["source"].endswith(")") and "http://" in r["source"] for r in ledger)  # lineage: the original URL


def test_media_folder_as_input(sample_dir, labels, tmp_path, ray_session):
    state = run_crawl(tmp_path / "run", sample_dir / "media")
    on_disk = [r for r in labels if r["path"].startswith("media/")]
    assert state["counts"]["input"] == len(on_disk)
    ledger = pq.read_table(tmp_path / "run" / "ledger.parquet").to_pylist()
    by_path = {f"media/{r['source']}": r for r in ledger}
    for label in on_disk:
        row = by_path[label["path"]]
        assert (row["reason"] if row["status"] == "rejected" else None) == label["expected_crawl_reason"], label


def test_rerun_on_a_complete_run_is_a_no_op(crawled, sample_server):
    run_dir, state = crawled
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "crawl" / "shards").iterdir()}
    again = run_crawl(run_dir, sample_server.url_lists["parquet"])
    assert again["counts"] == state["counts"]
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "crawl" / "shards").iterdir()} == before


def test_changed_settings_on_a_complete_stage_is_a_clear_error(crawled, sample_server):
    from curation.config import ConfigError

    run_dir, _ = crawled
    with pytest.raises(ConfigError, match="stage crawl was completed with other settings"):
        run_crawl(run_dir, sample_server.url_lists["parquet"], "crawl.max_bytes=1000")


def digest_run(run_dir: Path) -> dict[str, str]:
    """sha256 of every shard file plus the ledger's content (the parquet bytes may embed writer metadata)."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((run_dir / "crawl" / "shards").iterdir())}
    out["ledger"] = json.dumps(pq.read_table(run_dir / "ledger.parquet").to_pylist(), sort_keys=True)
    return out


def test_killed_run_resumes_to_the_same_shards_and_ledger(crawled, sample_server, tmp_path):
    """SIGKILL a `curation run` after its first shards finish; the re-run ends where an uninterrupted run does."""
    run_dir, _ = crawled
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "curation.cli", "run", str(DEMO), "--out", str(killed),
           "--set", f"input.path={sample_server.url_lists['parquet']}", "--set", "stages=[crawl]",
           "--set", "crawl.parallelism=1"]  # fmt: skip
    proc = subprocess.Popen(cmd + ["--set", "crawl.parallelism=1"], start_new_session=True, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    done_dir = killed / "crawl" / "done"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and len(list(done_dir.glob("*.json"))) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = len(list((run_dir / "crawl" / "done").glob("*.json")))
    finished_before_kill = len(list(done_dir.glob("*.json")))
    assert 1 <= finished_before_kill < total
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 already complete" in resumed.stderr or f"{finished_before_kill} already complete" in resumed.stderr
    assert digest_run(killed) == digest_run(run_dir)
    # img2dataset's working folder and half-written files of the killed attempt are gone
    assert not (killed / "crawl" / "_work").exists()
    assert not [p for p in (killed / "crawl").rglob(".*.tmp-*")]
