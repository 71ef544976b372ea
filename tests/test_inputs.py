"""input.path readers: URL lists in three formats and two column conventions, shard folders, media folders."""

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from curation.config import InputConfig
from curation.inputs import detect_format, read_input

pytestmark = pytest.mark.quick

ROWS = [
    {"url": "http://h/a.jpg", "caption": "a red circle"},
    {"url": "http://h/b.mp4", "caption": "a moving square"},
    {"url": "http://h/c.flac", "caption": "a low tone"},
    {"url": None, "caption": "no url here"},
    {"url": "http://h/e.png", "caption": ""},
]


def write_list(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        pacsv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_url_lists_in_every_format_give_the_same_records(tmp_path, fmt):
    path = tmp_path / f"urls.{fmt}"
    write_list(path, ROWS, fmt)
    assert detect_format(path) == fmt
    table = read_input(InputConfig(path=str(path)))
    rows = table.to_pylist()
    assert [r["modality"] for r in rows[:3]] == ["image", "video", "audio"]
    assert rows[0]["url"] == "http://h/a.jpg" and rows[0]["caption"] == "a red circle"
    assert rows[3]["input_error"] == "missing_url" and str(path) in rows[3]["input_detail"]
    assert rows[4]["input_error"] == "missing_caption"
    assert len({r["uid"] for r in rows}) == len(rows)
    assert all(len(r["uid"]) == 16 and "." not in r["uid"] for r in rows)
    # the same list read twice gives the same uids
    assert read_input(InputConfig(path=str(path))).column("uid").to_pylist() == table.column("uid").to_pylist()


def test_laion_column_names_and_explicit_modality(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(
        pa.table({"URL": ["http://h/x", "http://h/y"], "TEXT": ["one", "two"], "modality": ["audio", "bogus"]}), path
    )
    rows = read_input(InputConfig(path=str(path))).to_pylist()
    assert rows[0]["url"] == "http://h/x" and rows[0]["caption"] == "one" and rows[0]["modality"] == "audio"
    assert rows[1]["input_error"] == "bad_modality"


def test_missing_url_column_is_a_clear_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("link_to_it,caption\nhttp://h/a,b\n")
    with pytest.raises(ValueError, match="no URL column"):
        read_input(InputConfig(path=str(path)))
    with pytest.raises(ValueError, match="column 'nope'"):
        read_input(InputConfig(path=str(path), url_column="nope"))
    assert read_input(InputConfig(path=str(path), url_column="link_to_it")).num_rows == 1


def test_bad_jsonl_line_becomes_a_reject_not_a_crash(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"url": "http://h/a.jpg", "caption": "ok"}\n{not json\n[1, 2]\n')
    rows = read_input(InputConfig(path=str(path))).to_pylist()
    assert [r["input_error"] for r in rows] == [None, "malformed_row", "malformed_row"]
    assert "line 2" in rows[1]["input_detail"]


def test_limit(tmp_path):
    path = tmp_path / "urls.jsonl"
    write_list(path, ROWS, "jsonl")
    assert read_input(InputConfig(path=str(path), limit=2)).num_rows == 2


def _tar_with(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_and_img2dataset_folders(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar_with(
        shards / "00000.tar",
        {
            "000000000.jpg": b"jpegbytes",
            "000000000.txt": b"a cat",
            "000000000.json": json.dumps({"url": "http://h/cat.jpg"}).encode(),
            "000000001.jpg": b"x",
            "000000002.txt": b"caption without media",
        },
    )
    assert detect_format(shards) == "webdataset"
    (shards / "00000_stats.json").write_text("{}")
    assert detect_format(shards) == "img2dataset"
    rows = read_input(InputConfig(path=str(shards))).to_pylist()
    assert len(rows) == 3
    assert rows[0]["caption"] == "a cat" and rows[0]["tar_member"] == "000000000.jpg" and "cat.jpg" in rows[0]["source"]
    assert rows[1]["input_error"] == "missing_caption"
    assert rows[2]["input_error"] == "missing_media"


def test_media_folder_with_captions_beside(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "a.txt").write_text("a square\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.wav").write_bytes(b"wav")
    assert detect_format(tmp_path) == "folder"
    rows = read_input(InputConfig(path=str(tmp_path))).to_pylist()
    assert [(r["source"], r["modality"], r["caption"], r["input_error"]) for r in rows] == [
        ("a.png", "image", "a square", None),
        ("sub/b.wav", "audio", None, "missing_caption"),
    ]


def test_nonexistent_path(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        read_input(InputConfig(path=str(tmp_path / "nope")))


def test_mixed_types_in_a_jsonl_field(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"url": 5, "caption": "number url"}\n{"url": "http://h/a.jpg", "caption": {"nested": 1}}\n')
    rows = read_input(InputConfig(path=str(path))).to_pylist()
    assert rows[0]["url"] == "5"
    assert rows[1]["caption"] == '{"nested": 1}'
