"""The tar index that the score stage and the trainer read crawl and release shards through."""

from __future__ import annotations

import io
import tarfile

import pytest

from curation.fsutil import tar_index


def _tarfile_view(path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}


@pytest.mark.quick
def test_tar_index_matches_tarfile_on_webdataset_shards(tmp_path):
    import webdataset as wds

    path = tmp_path / "shard.tar"
    with open(path, "wb") as f:
        sink = wds.TarWriter(f, mtime=0)
        for i, size in enumerate([0, 1, 511, 512, 513, 70_000]):
            sink.write({"__key__": f"{i:06d}", "jpg": bytes([i]) * size, "txt": f"caption {i}", "json": b"{}"})
        sink.close()
    index = tar_index(path)
    assert index == _tarfile_view(path) and len(index) == 18
    data = path.read_bytes()
    offset, size = index["000005.jpg"]
    assert size == 70_000 and data[offset : offset + size] == bytes([5]) * size


@pytest.mark.quick
def test_tar_index_reads_extended_headers_through_tarfile(tmp_path):
    """Names longer than a ustar header holds get PAX (or GNU) records: the index must still find every member."""
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for name, body in [("k" * 150 + ".jpg", b"x" * 600), ("short.txt", b"caption"), ("dir/é.json", b"{}")]:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
        index = tar_index(path)
        assert index == _tarfile_view(path) and index["k" * 150 + ".jpg"][1] == 600
