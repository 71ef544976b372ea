"""The embedded sample: generated media, labels, determinism, and the loopback server's routes."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.sample import DEFECTS, SampleServer, generate_sample, write_url_lists
from curation.sample.generate import BACKGROUNDS, CAPTION_DEFECTS, COLORS, GRAY_COLORS, PITCHES, POSITIONS

pytestmark = pytest.mark.quick

SMALL = {"n_image": 40, "n_video": 8, "n_audio": 12}
URL_ONLY = {"dead_url": "dead/", "slow_url": "slow/", "oversized_file": "oversized/"}
NOT_A = {"image": "not_an_image", "video": "not_a_video", "audio": "not_an_audio"}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small")
    generate_sample(out, seed=7, **SMALL)
    return out


@pytest.fixture(scope="module")
def rows(small) -> list[dict]:
    return pq.read_table(small / "labels.parquet").to_pylist()


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def attrs_of(row: dict) -> dict:
    return json.loads(row["attrs"])


# -- decoding helpers -------------------------------------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def decode_video(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    return sf.read(io.BytesIO(data), dtype="float32")


DECODERS = {"image": decode_image, "video": decode_video, "audio": decode_audio}


# -- generation -------------------------------------------------------------------------------------------------


def test_labels_schema_and_files(small, rows):
    table = pq.read_table(small / "labels.parquet")
    for name in ("id", "modality", "path", "caption", "defect", "dup_of", "expected_crawl_reason", "clean_caption_ok"):
        assert name in table.column_names
    assert str(table.schema.field("clean_caption_ok").type) == "bool"
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        assert "." not in r["id"] and r["id"][:4] in ("img-", "vid-", "aud-")
        assert r["defect"] is None or r["defect"] in DEFECTS
        assert r["caption"]
        assert r["clean_caption_ok"] == (r["defect"] not in CAPTION_DEFECTS)
        if r["defect"] in URL_ONLY:
            assert r["path"] == f"{URL_ONLY[r['defect']]}{r['path'].split('/', 1)[1]}"
            assert not (small / "media" / r["modality"] / Path(r["path"]).name).exists()
        else:
            assert r["path"].startswith(f"media/{r['modality']}/{r['id']}.")
            assert (small / r["path"]).is_file()
            assert (small / r["path"]).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"]
        if r["defect"] in ("exact_duplicate", "near_duplicate"):
            src = by_id[r["dup_of"]]
            assert src["defect"] is None and src["modality"] == r["modality"] and src["id"] < r["id"]
        else:
            assert r["dup_of"] is None
        expected = {
            "dead_url": "http_404",
            "slow_url": "timeout",
            "oversized_file": "too_large",
            "truncated_file": "truncated",
            "corrupt_file": NOT_A[r["modality"]],
        }.get(r["defect"])
        assert r["expected_crawl_reason"] == expected
    # nothing on disk that the labels do not know about
    on_disk = {str(p.relative_to(small)) for p in (small / "media").rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert on_disk == {r["path"] for r in rows if r["path"].startswith("media/")}
    meta = json.loads((small / "sample.json").read_text())
    assert meta["seed"] == 7 and meta["rows"] == len(rows) and meta["generator_version"]


def test_every_defect_in_every_modality(rows):
    for modality, n in zip(("image", "video", "audio"), SMALL.values()):
        mine = [r for r in rows if r["modality"] == modality]
        assert sum(r["defect"] is None for r in mine) == n
        for defect in DEFECTS:
            k = sum(r["defect"] == defect for r in mine)
            assert k >= (max(3, min(15, n // 3)) if defect in CAPTION_DEFECTS else 3), (modality, defect, k)


def test_default_sample_counts(sample_dir):
    meta = json.loads((sample_dir / "sample.json").read_text())
    assert meta["clean"] == {"image": 240, "video": 48, "audio": 72}
    for modality in ("image", "video", "audio"):
        for defect in DEFECTS:
            assert meta["defects"][modality][defect] >= (15 if defect in CAPTION_DEFECTS else 3)
    assert meta["clean"]["image"] / meta["counts"]["image"] >= 0.7


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    generate_sample(tmp_path / "again", seed=7, **SMALL)
    first, again = tree_hashes(small), tree_hashes(tmp_path / "again")
    assert first == again
    generate_sample(tmp_path / "other", seed=8, **SMALL)
    other = tree_hashes(tmp_path / "other")
    media = [k for k in first if k.startswith("media/") and not k.endswith(".txt")]
    assert sum(first[k] == other.get(k) for k in media) < len(media) // 10


def test_regenerating_into_the_same_dir_replaces_the_media(tmp_path):
    generate_sample(tmp_path, seed=1, n_image=6, n_video=3, n_audio=3, defect_rate=0.0)
    generate_sample(tmp_path, seed=2, n_image=4, n_video=3, n_audio=3, defect_rate=0.0)
    assert len(list((tmp_path / "media" / "image").glob("*.txt"))) == 4
    (tmp_path / "sample.json").unlink()
    with pytest.raises(FileExistsError):
        generate_sample(tmp_path, seed=2, n_image=4, n_video=3, n_audio=3)


def test_good_files_decode_completely(small, rows):
    for r in rows:
        if r["defect"] in ("corrupt_file", "truncated_file") or r["defect"] in URL_ONLY:
            continue
        a = attrs_of(r)
        data = (small / r["path"]).read_bytes()
        if r["modality"] == "image":
            img = decode_image(data)
            assert img.size == (a["width"], a["height"]) and img.mode == a["mode"], r["id"]
        elif r["modality"] == "video":
            frames = decode_video(data)
            assert len(frames) == a["frames"] and frames[0].shape[:2] == (a["height"], a["width"]), r["id"]
        else:
            samples, sr = decode_audio(data)
            assert sr == a["sample_rate"] and len(samples) == a["samples"], r["id"]
            assert 0.5 <= len(samples) / sr <= 3.0


def test_formats_and_modes_vary(rows):
    image = [attrs_of(r) for r in rows if r["modality"] == "image" and r["defect"] is None]
    assert {a["format"] for a in image} >= {"png", "jpg"}
    assert {"RGB", "L"} <= {a["mode"] for a in image} or {"RGB", "P"} <= {a["mode"] for a in image}
    assert max(max(a["width"] / a["height"], a["height"] / a["width"]) for a in image) >= 2
    audio = [attrs_of(r) for r in rows if r["modality"] == "audio" and r["defect"] is None]
    assert {a["format"] for a in audio} == {"wav", "flac"}


def _riff_declared_size(data: bytes) -> int:
    return struct.unpack("<I", data[4:8])[0] + 8


def test_truncated_files_do_not_decode_fully(small, rows):
    truncated = [r for r in rows if r["defect"] == "truncated_file"]
    assert {r["modality"] for r in truncated} == {"image", "video", "audio"}
    for r in truncated:
        a = attrs_of(r)
        data = (small / r["path"]).read_bytes()
        assert 0.4 * a["full_bytes"] <= len(data) <= 0.7 * a["full_bytes"]
        try:
            decoded = DECODERS[r["modality"]](data)
        except Exception:
            continue
        if r["modality"] == "image":
            pytest.fail(f"{r['id']}: truncated image decoded")
        elif r["modality"] == "video":
            assert len(decoded) < a["frames"], r["id"]
        else:
            assert len(decoded[0]) < a["samples"], r["id"]
            if data[:4] == b"RIFF":  # libsndfile reads a cut WAV silently; its header still tells
                assert _riff_declared_size(data) > len(data)


def test_corrupt_files_are_not_media(small, rows):
    corrupt = [r for r in rows if r["defect"] == "corrupt_file"]
    assert {r["modality"] for r in corrupt} == {"image", "video", "audio"}
    for r in corrupt:
        data = (small / r["path"]).read_bytes()
        for decode in DECODERS.values():
            with pytest.raises(Exception):  # noqa: B017 - each library raises its own type
                decode(data)


def test_duplicates(small, rows):
    by_id = {r["id"]: r for r in rows}
    for r in rows:
        if r["defect"] not in ("exact_duplicate", "near_duplicate"):
            continue
        data, orig = (small / r["path"]).read_bytes(), (small / by_id[r["dup_of"]]["path"]).read_bytes()
        assert r["true_caption"] == by_id[r["dup_of"]]["true_caption"]
        if r["defect"] == "exact_duplicate":
            assert data == orig
            continue
        assert data != orig
        if r["modality"] == "image":
            thumbs = [np.asarray(decode_image(b).convert("L").resize((16, 16)), np.float32) for b in (data, orig)]
            assert np.abs(thumbs[0] - thumbs[1]).mean() < 12, r["id"]


def test_captions_match_pixels_and_sound(small, rows):
    """A clean caption's colour, position, motion and pitch are really in the file: the signal is learnable."""
    palette = {**COLORS, **GRAY_COLORS}
    for r in rows:
        if r["defect"] is not None:
            continue
        a = attrs_of(r)
        data = (small / r["path"]).read_bytes()
        if r["modality"] == "image":
            rgb = np.asarray(decode_image(data).convert("RGB"), np.float32)
            fg = np.abs(rgb - BACKGROUNDS[a["bg"]]).max(axis=2) > 60
            nearest = min(palette, key=lambda c: np.abs(rgb[fg].mean(axis=0) - palette[c]).sum())
            assert nearest == a["color"], r["id"]
            ys, xs = np.nonzero(fg)
            px, py = xs.mean() / rgb.shape[1], ys.mean() / rgb.shape[0]
            pos = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - px) ** 2 + (POSITIONS[p][1] - py) ** 2)
            assert pos == a["position"], r["id"]
        elif r["modality"] == "video":
            frames = decode_video(data)
            centers = []
            for f in (frames[0], frames[-1]):
                fg = np.abs(f.astype(np.float32) - BACKGROUNDS[a["bg"]]).max(axis=2) > 60
                ys, xs = np.nonzero(fg)
                centers.append((xs.mean(), ys.mean()))
            dx, dy = centers[1][0] - centers[0][0], centers[1][1] - centers[0][1]
            motion = ("left_to_right" if dx > 0 else "right_to_left") if abs(dx) > abs(dy) else None
            motion = motion or ("top_to_bottom" if dy > 0 else "bottom_to_top")
            assert motion == a["motion"], r["id"]
        elif a["kind"] == "tone" and a["pattern"] == "steady":
            samples, sr = decode_audio(data)
            mono = samples if samples.ndim == 1 else samples[:, 0]
            peak = np.argmax(np.abs(np.fft.rfft(mono))) * sr / len(mono)
            lo, hi = PITCHES[a["pitch"]]
            assert lo * 0.95 <= peak <= hi * 1.05, r["id"]


def test_bad_captions_are_bad(rows):
    for r in rows:
        if r["defect"] == "mismatched_caption" and r["modality"] in ("image", "video"):
            a = attrs_of(r)
            words = r["caption"].split()
            assert a["color"] not in words and a["shape"] not in words, r["caption"]
        elif r["defect"] == "non_english_caption":
            assert r["caption"] != r["true_caption"] and attrs_of(r)["language"] in ("de", "fr", "es", "it")
        elif r["defect"] == "gibberish_caption":
            assert r["caption"].strip()


# -- server -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(small):
    with SampleServer(small, slow_seconds=2.0, oversized_bytes=4 * 2**20) as srv:
        yield srv


def raw_get(srv: SampleServer, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_server_serves_media_with_keepalive(server, small, rows):
    assert server.base_url.startswith("http://127.0.0.1:")
    clean = [r for r in rows if r["defect"] is None][:6]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    before = server.requests_served
    for r in clean:
        conn.request("GET", "/" + r["path"])
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and body == (small / r["path"]).read_bytes()
        assert int(resp.headers["Content-Length"]) == len(body)
        assert resp.headers["Content-Type"].split("/")[0] == r["modality"]
    conn.close()
    assert server.requests_served - before == len(clean)
    with urllib.request.urlopen(f"{server.base_url}/{clean[0]['path']}", timeout=5) as resp:
        assert resp.read() == (small / clean[0]["path"]).read_bytes()
    status, headers, body = raw_get(server, "/" + clean[0]["path"], method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_server_error_routes(server, rows):
    dead = next(r for r in rows if r["defect"] == "dead_url")
    assert raw_get(server, "/" + dead["path"])[0] == 404
    assert raw_get(server, "/media/image/no-such-file.png")[0] == 404
    assert raw_get(server, "/nowhere")[0] == 404
    for bad in ("/media/../labels.parquet", "/media/%2e%2e/labels.parquet", "/media/image/..%2f..%2flabels.parquet"):
        assert raw_get(server, bad)[0] == 403, bad


def test_oversized_route_announces_more_than_the_cap(server, rows):
    big = next(r for r in rows if r["defect"] == "oversized_file")
    with urllib.request.urlopen(f"{server.base_url}/{big['path']}", timeout=5) as resp:
        assert int(resp.headers["Content-Length"]) == 4 * 2**20
        assert len(resp.read(2**20)) == 2**20  # a capped client reads this much and hangs up
    assert raw_get(server, "/dead/x.png")[0] == 404  # still serving after the disconnect


def test_slow_route_stalls(server, rows):
    slow = next(r for r in rows if r["defect"] == "slow_url")
    started = time.monotonic()
    with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
        urllib.request.urlopen(f"{server.base_url}/{slow['path']}", timeout=0.5).read()
    assert time.monotonic() - started < 1.5


def test_ratelimited_then_served_and_redirects(server, small, rows):
    clean = next(r for r in rows if r["defect"] is None)
    rest = clean["path"].split("/", 1)[1]
    status, headers, _ = raw_get(server, f"/ratelimited/{rest}")
    assert status == 429 and headers["Retry-After"] == "1"
    status, _, body = raw_get(server, f"/ratelimited/{rest}")
    assert status == 200 and body == (small / clean["path"]).read_bytes()
    status, headers, _ = raw_get(server, f"/redirect/3/{rest}")
    assert status == 302 and headers["Location"] == f"{server.base_url}/redirect/2/{rest}"
    with urllib.request.urlopen(f"{server.base_url}/redirect/3/{rest}", timeout=5) as resp:
        assert resp.read() == (small / clean["path"]).read_bytes()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server.base_url}/loop/{rest}", timeout=5)


def test_stop_is_prompt_with_a_slow_request_in_flight(small):
    srv = SampleServer(small, slow_seconds=30.0).start()
    done = threading.Event()

    def stalled():
        try:
            urllib.request.urlopen(f"{srv.base_url}/slow/x.png", timeout=30).read()
        except Exception:
            pass
        done.set()

    threading.Thread(target=stalled, daemon=True).start()
    time.sleep(0.3)
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 2
    assert done.wait(2)


def test_only_loopback(small):
    with pytest.raises(ValueError):
        SampleServer(small, host="0.0.0.0")


def test_url_lists(server, small, rows):
    paths = write_url_lists(small, server.base_url)
    assert set(paths) == {"parquet", "csv", "jsonl"}
    import pyarrow.csv as pacsv

    tables = {
        "parquet": pq.read_table(paths["parquet"]).to_pylist(),
        "csv": pacsv.read_csv(paths["csv"]).to_pylist(),
        "jsonl": [json.loads(line) for line in paths["jsonl"].read_text(encoding="utf-8").splitlines()],
    }
    for fmt, table in tables.items():
        assert [t["id"] for t in table] == [r["id"] for r in rows], fmt
        assert [t["url"] for t in table] == [f"{server.base_url}/{r['path']}" for r in rows], fmt
        assert [t["caption"] for t in table] == [r["caption"] for r in rows], fmt
        assert [t["modality"] for t in table] == [r["modality"] for r in rows], fmt
