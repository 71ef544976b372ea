"""Decontamination: records that copy an evaluation item (exactly, perceptually or semantically) are found, whatever
form the evaluation set comes in."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dedup_media import TONE, audio, audio_variants, image, image_variants

from curation.dedup.decontaminate import find_contaminated, load_reference
from curation.dedup.perceptual import Thresholds, fingerprint

pytestmark = pytest.mark.quick

THRESHOLDS = {
    "image": Thresholds(12, 5.0),
    "video": Thresholds(10, 6.0, 0.05),
    "audio": Thresholds(4, 0.7, 0.05),
}


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    (folder / "sub").mkdir()
    (folder / "star.png").write_bytes(image(1))
    (folder / "sub" / "circle.png").write_bytes(image(2, shape="circle", color="green"))
    (folder / "beeps.wav").write_bytes(audio(5, TONE)[0])
    (folder / "notes.txt").write_text("not media")
    return folder


def records(items: list[tuple[bytes, str]]):
    """What the dedup stage hands find_contaminated for these (media, modality) records."""
    import hashlib

    sha = np.asarray([hashlib.sha256(b).hexdigest() for b, _ in items], dtype=object)
    modality = np.asarray([m for _, m in items])
    fps = {}
    for m in ("image", "video", "audio"):
        pos = np.flatnonzero(modality == m)
        got = [fingerprint(items[i][0], m) for i in pos]
        words = np.stack([f.words for f in got]) if got else np.empty((0, 1), np.uint64)
        profiles = np.stack([f.profile for f in got]) if got else np.empty((0, 1), np.float32)
        fps[m] = (pos, words, profiles, np.full(len(pos), np.nan))
    return sha, modality, fps


def test_media_folder_exact_and_perceptual_matches(eval_folder):
    ref = load_reference(eval_folder)
    assert sorted(ref.column("id").to_pylist()) == ["beeps.wav", "star.png", "sub/circle.png"]
    _, samples, rate = audio(5, TONE)
    items = [
        (image(1), "image"),  # exact copy of star.png
        (image_variants(image(2, shape="circle", color="green"))["recompress"], "image"),  # near copy of circle.png
        (image(3), "image"),  # same description as star.png, another rendering: clean
        (audio_variants(samples, rate)["resample_22050"], "audio"),  # near copy of beeps.wav
        (audio(6, TONE)[0], "audio"),  # clean
    ]
    sha, modality, fps = records(items)
    hits = find_contaminated(sha, modality, fps, {}, ref, THRESHOLDS, semantic_eps=None)
    assert {i: (ref_id, how) for i, (ref_id, how, _) in hits.items()} == {
        0: ("star.png", "exact"),
        1: ("sub/circle.png", "perceptual"),
        3: ("beeps.wav", "perceptual"),
    }


def test_file_lists_in_every_form(eval_folder, tmp_path):
    (tmp_path / "list.txt").write_text(
        f"# eval images\n{eval_folder / 'star.png'}\nfile://{eval_folder / 'beeps.wav'}\n"
    )
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": str(eval_folder / "star.png"), "id": "q1"}) + "\n")
    pq.write_table(pa.table({"url": [f"file://{eval_folder / 'sub' / 'circle.png'}"]}), tmp_path / "list.parquet")
    assert load_reference(tmp_path / "list.txt").num_rows == 2
    assert load_reference(tmp_path / "list.jsonl").column("id").to_pylist() == ["q1"]
    assert load_reference(tmp_path / "list.parquet").column("modality").to_pylist() == ["image"]
    (tmp_path / "remote.txt").write_text("https://example.com/x.png\n")
    with pytest.raises(ValueError, match="not a local file"):
        load_reference(tmp_path / "remote.txt")


def test_reference_table_with_hashes_and_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pq.write_table(
        pa.table(
            {
                "uid": ["e1", "e2", "e3"],
                "modality": ["image"] * 3,
                "sha256": ["ab" * 32, None, None],
                "embedding": pa.array(emb.tolist(), pa.list_(pa.float32())),
            }
        ),  # fmt: skip
        tmp_path / "ref.parquet",
    )
    ref = load_reference(tmp_path / "ref.parquet")
    x = np.stack([emb[1] + 0.001, rng.standard_normal(8), rng.standard_normal(8)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sha = np.asarray(["00" * 32, "ab" * 32, "11" * 32], dtype=object)
    empty = (np.empty(0, np.int64), np.empty((0, 1), np.uint64), np.empty((0, 1), np.float32), np.empty(0))
    fps = dict.fromkeys(("image", "video", "audio"), empty)
    hits = find_contaminated(sha, np.asarray(["image"] * 3), fps, {"image": (np.arange(3), x)}, ref, THRESHOLDS, 0.01)
    assert {i: h[:2] for i, h in hits.items()} == {0: ("e2", "semantic"), 1: ("e1", "exact")}
    # without semantic matching only the hash counts
    hits = find_contaminated(sha, np.asarray(["image"] * 3), fps, {"image": (np.arange(3), x)}, ref, THRESHOLDS, None)
    assert set(hits) == {1}
