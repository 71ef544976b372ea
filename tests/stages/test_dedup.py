"""The dedup stage end to end on the embedded sample: crawl -> dedup finds the labelled exact and near duplicates
of every modality, names their originals, resumes after a kill, and runs semantic dedup and decontamination when
it has embeddings and an evaluation set."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_runs import ledger_by_id, run_demo

from curation.ledger import assemble_ledger
from curation.schemas import validate

DUPLICATES = ("exact_duplicate", "near_duplicate")

pytestmark = pytest.mark.slow


def run(out: Path, input_path, *overrides: str) -> dict:
    return run_demo(out, input_path, ["crawl", "dedup"], *overrides)


@pytest.fixture(scope="module")
def deduped(tmp_path_factory, sample_server, ray_session):
    out = tmp_path_factory.mktemp("run") / "dedup"
    state = run(out, sample_server.url_lists["parquet"])
    return out, state


def test_labelled_duplicates_are_found_with_their_originals(deduped, labels, sample_server):
    run_dir, state = deduped
    ledger = ledger_by_id(run_dir, sample_server.url_lists["parquet"])
    id_of = {row["uid"]: sample_id for sample_id, row in ledger.items()}
    by_id = {label["id"]: label for label in labels}
    scores = {}
    for modality in ("image", "video", "audio"):
        mine = [lab for lab in labels if lab["modality"] == modality]
        rejected = [lab for lab in mine if ledger[lab["id"]]["stage"] == "dedup"]
        # duplicates the crawl let through (a copy's original may itself have been rejected by the crawl)
        present = [lab for lab in mine if lab["defect"] in DUPLICATES and ledger[lab["id"]]["stage"] != "crawl"]
        hits = [lab for lab in rejected if lab["defect"] in DUPLICATES]
        precision = len(hits) / max(1, len(rejected))
        recall = len([lab for lab in present if ledger[lab["id"]]["stage"] == "dedup"]) / max(1, len(present))
        scores[modality] = (precision, recall, len(present))
        assert present, modality
        for lab in hits:
            row = ledger[lab["id"]]
            assert row["reason"] in ("duplicate_exact", "duplicate_perceptual"), row
            want = "duplicate_exact" if lab["defect"] == "exact_duplicate" else "duplicate_perceptual"
            assert row["reason"] == want, (lab["id"], row["reason"], row["detail"])
            # dup_of names the original, or another copy of the same original
            named = id_of[row["dup_of"]]
            assert named == lab["dup_of"] or by_id[named]["dup_of"] == lab["dup_of"], (lab["id"], named)
            assert ledger[named]["status"] == "kept"
    print("dedup precision/recall per modality:", scores)
    for modality, (precision, recall, _) in scores.items():
        assert precision >= 0.95 and recall >= 0.95, (modality, scores)
    summary = state["stages"]["dedup"]["summary"]
    assert summary["input"] == summary["kept"] + summary["rejected"]
    assert any("semantic dedup skipped" in note for note in summary["notes"])  # no score stage in this run


def test_ledger_rows_validate_and_duplicates_table_matches(deduped):
    run_dir, state = deduped
    rows = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    kept = {r["uid"] for r in rows if r["status"] == "kept"}
    dedup_rows = [r for r in rows if r["stage"] == "dedup"]
    for row in rows:
        validate("ledger_row", row)
    for row in dedup_rows:
        assert row["dup_of"] in kept and row["reason"].startswith("duplicate_")
    table = pq.read_table(run_dir / "dedup" / "duplicates.parquet").to_pylist()
    for row in table:
        validate("duplicate", row)
    for path in sorted((run_dir / "dedup" / "fingerprints").glob("*.parquet"))[:2]:
        for row in pq.read_table(path).to_pylist():
            validate("fingerprint", row)
    assert {(r["uid"], r["dup_of"], r["reason"]) for r in table} == {
        (r["uid"], r["dup_of"], r["reason"]) for r in dedup_rows
    }
    assert state["counts"]["input"] == state["counts"]["kept"] + state["counts"]["rejected"]


def _as_after_crawl(src: Path, dst: Path) -> Path:
    """A copy of a finished run as it stood before dedup completed (its fingerprints kept)."""
    shutil.copytree(src, dst)
    (dst / "dedup" / "_SUCCESS.json").unlink()
    shutil.rmtree(dst / "dedup" / "ledger")
    assemble_ledger(dst, ["crawl"])
    return dst


def test_a_killed_run_resumes_to_the_same_ledger(deduped, sample_server, tmp_path):
    run_dir, _ = deduped
    copy = _as_after_crawl(run_dir, tmp_path / "resumed")
    fingerprints = sorted((copy / "dedup" / "fingerprints").glob("*.parquet"))
    lost = fingerprints[1]
    lost.unlink()  # killed mid-shard: its done marker never came, or came for a file that is gone
    (copy / "dedup" / "done" / f"{lost.stem}.json").unlink()
    untouched = {p: p.stat().st_mtime_ns for p in fingerprints if p != lost}
    run(copy, sample_server.url_lists["parquet"])
    assert pq.read_table(copy / "ledger.parquet").equals(pq.read_table(run_dir / "ledger.parquet"))
    assert lost.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())  # finished shards were not redone


def test_semantic_dedup_and_decontamination(deduped, sample_server, sample_dir, labels, tmp_path):
    from PIL import Image

    run_dir, _ = deduped
    copy = _as_after_crawl(run_dir, tmp_path / "semantic")
    ledger = ledger_by_id(copy, sample_server.url_lists["parquet"])
    clean = [lab for lab in labels if lab["defect"] is None and ledger[lab["id"]]["status"] == "kept"]
    images = [lab for lab in clean if lab["modality"] == "image"]
    audios = [lab for lab in clean if lab["modality"] == "audio"]
    # the score stage's contract: score/embeddings/<shard>.parquet with uid, modality, embedding (normalised)
    rng = np.random.default_rng(0)
    records = pa.concat_tables([pq.read_table(p) for p in sorted((copy / "crawl" / "shards").glob("*.parquet"))])
    uids, mods = records.column("uid").to_pylist(), records.column("modality").to_pylist()
    emb = rng.standard_normal((len(uids), 64)).astype(np.float32)
    row = {u: i for i, u in enumerate(uids)}
    twin_a, twin_b = ledger[images[10]["id"]]["uid"], ledger[images[20]["id"]]["uid"]  # distinct images ...
    emb[row[twin_b]] = emb[row[twin_a]] + 0.001  # ... that the encoder would call the same
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    (copy / "score" / "embeddings").mkdir(parents=True)
    pq.write_table(
        pa.table({"uid": uids, "modality": mods, "embedding": pa.array(emb.tolist(), pa.list_(pa.float32()))}),
        copy / "score" / "embeddings" / "00000.parquet",
    )
    # an evaluation set: one image copied as is, one re-encoded, one audio clip copied
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    shutil.copy(sample_dir / images[0]["path"], eval_dir / "a.png")
    Image.open(sample_dir / images[1]["path"]).convert("RGB").save(eval_dir / "b.jpg", quality=60)
    shutil.copy(sample_dir / audios[0]["path"], eval_dir / Path(audios[0]["path"]).name)
    run(copy, sample_server.url_lists["parquet"], f"dedup.decontaminate={eval_dir}")
    after = ledger_by_id(copy, sample_server.url_lists["parquet"])
    contaminated = {sid for sid, r in after.items() if r["reason"] == "contaminated"}
    assert contaminated == {images[0]["id"], images[1]["id"], audios[0]["id"]}
    assert after[images[0]["id"]]["dup_of"] == "eval:a.png" and "exact" in after[images[0]["id"]]["detail"]
    assert after[images[1]["id"]]["dup_of"] == "eval:b.jpg" and "perceptual" in after[images[1]["id"]]["detail"]
    twins = [after[images[10]["id"]], after[images[20]["id"]]]
    assert sorted(r["status"] for r in twins) == ["kept", "rejected"]
    loser, winner = twins if twins[0]["status"] == "rejected" else twins[::-1]
    assert loser["reason"] == "duplicate_semantic" and loser["dup_of"] == winner["uid"]
    semantic = [r for r in after.values() if r["reason"] == "duplicate_semantic"]
    assert len(semantic) == 1  # random embeddings are otherwise far apart
    # the earlier levels still find what they found before
    before = {sid: r["reason"] for sid, r in ledger_by_id(run_dir, sample_server.url_lists["parquet"]).items()}
    assert {sid for sid, r in after.items() if r["reason"] in ("duplicate_exact", "duplicate_perceptual")} == {
        sid for sid, reason in before.items() if reason in ("duplicate_exact", "duplicate_perceptual")
    }


def test_caption_scope_decides_what_a_repeated_caption_means(deduped, sample_server, labels, tmp_path):
    from curation.dedup.exact import normalize_captions

    run_dir, _ = deduped
    url_list = sample_server.url_lists["parquet"]
    before = ledger_by_id(run_dir, url_list)
    survivors = [lab for lab in labels if before[lab["id"]]["status"] == "kept"]
    keys = normalize_captions([lab["caption"] for lab in survivors])
    repeated = {k for k in keys if keys.count(k) > 1}
    assert repeated  # the sample gives distinct items equal captions ...
    assert not any(r["reason"] == "duplicate_caption" for r in before.values())  # ... and media scope keeps them
    copy = _as_after_crawl(run_dir, tmp_path / "captions")
    run(copy, url_list, "dedup.caption_scope=global", "dedup.caption_min_words=0")
    after = ledger_by_id(copy, url_list)
    by_uid = {r["uid"]: sid for sid, r in after.items()}
    text = {lab["id"]: key for lab, key in zip(labels, normalize_captions([lab["caption"] for lab in labels]))}
    dropped = {sid: r for sid, r in after.items() if r["reason"] == "duplicate_caption"}
    assert dropped  # global scope: the caption alone decides
    for sid, row in dropped.items():
        original = by_uid[row["dup_of"]]
        assert after[original]["status"] == "kept" and after[original]["modality"] == row["modality"]
        assert text[sid] == text[original] or len(text[sid].split()) >= 5  # equal, or a MinHash near match
