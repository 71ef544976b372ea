"""The release stage: shards that webdataset, HF datasets and a LLaVA-style reader read back, schemas, byte-identical
re-releases, and publishing to S3 (moto on loopback) file for file."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from crawled_runs import crawl_by_hand, make_config, png, tiny_tokenizer, write_media_folder

from curation.cli import main
from curation.config import ConfigError
from curation.instruct import MEDIA_TOKENS
from curation.release import verify_release
from curation.runner import Run
from curation.schemas import SCHEMA_DIR, validate
from curation.stages.release import ReleaseStage

pytestmark = pytest.mark.slow
BOOKKEEPING = {"ledger", "done", "_work", "_SUCCESS.json", "published"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def released(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("release")
    media = write_media_folder(tmp / "media", {"sneaky.png": (png(99), "a caption with <image> in it")})
    config = make_config(
        media,
        ["crawl", "format", "release"],
        format={"tokenizer": tiny_tokenizer(tmp / "tok")},
        release={"exports": ["llava", "sharegpt"], "max_shard_samples": 3, "name": "tiny set"},
    )
    state = Run(config, tmp / "run").run()  # the real crawl stage reads the media folder: no network
    return tmp / "run", state


def index_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "release" / "index.parquet").to_pylist()


def release_files(folder: Path) -> dict[str, bytes]:
    """Every file of a release folder, by relative path, without the run's bookkeeping."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] not in BOOKKEEPING
    }


def test_every_record_is_accounted_for(released):
    run_dir, state = released
    counts = state["counts"]
    assert counts == {"input": 11, "kept": 10, "rejected": 1}
    summary = state["stages"]["release"]["summary"]
    assert summary["input"] == summary["kept"] == 10 and summary["rejected"] == 0
    ledger = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    for row in ledger:
        validate("ledger_row", row)
    assert {r["uid"] for r in ledger if r["status"] == "kept"} == {r["key"] for r in index_rows(run_dir)}


def test_shards_read_back_with_webdataset_and_validate(released):
    import webdataset as wds

    run_dir, _ = released
    index = {r["key"]: r for r in index_rows(run_dir)}
    shards = sorted(str(p) for p in (run_dir / "release").glob("*.tar"))
    seen = set()
    for sample in wds.WebDataset(shards, shardshuffle=False):
        key = sample["__key__"]
        assert "." not in key and key not in seen
        seen.add(key)
        row = index[key]
        assert Path(sample["__url__"]).name == row["shard"] and row["shard"].startswith(
            f"{row['modality']}-{row['ext']}-"
        )
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {row["ext"], "json", "txt"}
        assert sha256(sample[row["ext"]]) == row["sha256"]
        meta = json.loads(sample["json"])
        validate("instruction_sample", meta)
        validate("record", meta["record"])
        assert meta["id"] == key and meta[row["modality"]] == f"{key}.{row['ext']}"
        assert sample["txt"].decode() == row["caption"] == meta["record"]["caption"]
        token = MEDIA_TOKENS[row["modality"]]
        assert meta["conversations"][0]["value"].startswith(f"{token}\n")
        assert sum(t["value"].count(token) for t in meta["conversations"]) == 1
        assert meta["tokens"]["input_ids"].count(-200) == 1
    assert seen == set(index)


def test_index_byte_ranges_point_at_the_media(released):
    run_dir, _ = released
    per_shard: dict[str, int] = {}
    for row in index_rows(run_dir):
        with open(run_dir / "release" / row["shard"], "rb") as f:
            f.seek(row["media_offset"])
            assert sha256(f.read(row["media_size"])) == row["sha256"]
        per_shard[row["shard"]] = per_shard.get(row["shard"], 0) + 1
    assert max(per_shard.values()) <= 3  # release.max_shard_samples
    assert {s.split("-")[0] for s in per_shard} == {"image", "video", "audio"}


def test_shards_load_with_hf_datasets(released, tmp_path):
    import datasets
    import webdataset as wds

    run_dir, _ = released
    index = index_rows(run_dir)
    series = sorted({r["shard"].rsplit("-", 1)[0] for r in index})
    for name in series:
        files = sorted(str(p) for p in (run_dir / "release").glob(f"{name}-*.tar"))
        modality, ext = name.split("-")
        kwargs = {}
        if modality == "audio":
            # HF encodes Audio columns with torchcodec; without it installed, read the audio as bytes
            first = next(iter(wds.WebDataset(files[:1], shardshuffle=False)))
            features = datasets.Features.from_arrow_schema(
                pa.Table.from_pylist([{"json": json.loads(first["json"])}]).schema
            )
            features.update({ext: datasets.Value("binary"), "txt": datasets.Value("string"),
                             "__key__": datasets.Value("string"), "__url__": datasets.Value("string")})  # fmt: skip
            kwargs["features"] = features
        ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                   cache_dir=str(tmp_path / "hf"), **kwargs)  # fmt: skip
        expected = [r for r in index if r["shard"].startswith(f"{name}-")]
        assert len(ds) == len(expected)
        if modality == "image":
            for sample, row in zip(ds, expected):
                assert sample["__key__"] == row["key"] and sample[ext].size == (row["width"], row["height"])
                assert sample["json"]["conversations"][0]["value"].startswith("<image>\n")
        else:
            if modality == "video":
                ds = ds.cast_column(ext, datasets.Video(decode=False))
            for sample, row in zip(ds, expected):
                data = sample[ext]["bytes"] if isinstance(sample[ext], dict) else sample[ext]
                assert sample["__key__"] == row["key"] and sha256(data) == row["sha256"]
                assert sample["txt"] == row["caption"]


def test_llava_export_reads_back_like_llava_does(released):
    from PIL import Image

    run_dir, _ = released
    exports = run_dir / "release" / "exports"
    index = {r["key"]: r for r in index_rows(run_dir)}
    for name in ("llava_instruct.json", "llava_pretrain.json"):
        items = json.loads((exports / name).read_text())
        assert {i["id"] for i in items} == set(index)
        for item in items:
            validate("instruction_sample", item)
            modality = index[item["id"]]["modality"]
            path = exports / "media" / item[modality]
            assert sha256(path.read_bytes()) == index[item["id"]]["sha256"]
            text = " ".join(t["value"] for t in item["conversations"])
            assert text.count(MEDIA_TOKENS[modality]) == 1
            assert item["conversations"][0]["value"].startswith(MEDIA_TOKENS[modality])
            if modality == "image":  # LLaVA: Image.open(os.path.join(image_folder, image)).convert("RGB")
                img = Image.open(path).convert("RGB")
                assert img.size == (index[item["id"]]["width"], index[item["id"]]["height"])


def test_sharegpt_export_counts_placeholders(released):
    run_dir, _ = released
    exports = run_dir / "release" / "exports"
    info = json.loads((exports / "dataset_info.json").read_text())
    assert set(info) == {"tiny_set_pretrain", "tiny_set_instruct"}
    for entry in info.values():
        items = json.loads((exports / entry["file_name"]).read_text())
        assert len(items) == 10
        for item in items:
            text = " ".join(m["content"] for m in item["messages"])
            assert [m["role"] for m in item["messages"]][:2] == ["user", "assistant"]
            for modality, key in (("image", "images"), ("video", "videos"), ("audio", "audios")):
                assert text.count(MEDIA_TOKENS[modality]) == len(item[key])
                assert all((exports / p).is_file() for p in item[key])


def test_manifest_card_and_schemas(released):
    run_dir, _ = released
    release = run_dir / "release"
    manifest = json.loads((release / "manifest.json").read_text())
    validate("manifest", manifest)
    assert verify_release(release) == []
    files = release_files(release)
    assert {e["path"] for e in manifest["files"]} | {"manifest.json"} == set(files)
    assert manifest["counts"] == {"samples": 10, "shards": 5, "rejected": 0, "image": 6, "video": 2, "audio": 2}
    assert manifest["tokenizer"]["name"] == "tok" and manifest["tokenizer"]["media_token_index"] == -200
    # every schema the project publishes travels with the release
    assert {p for p in files if p.startswith("schemas/")} == {
        f"schemas/{p.name}" for p in SCHEMA_DIR.glob("*.schema.json")
    }
    assert {"schemas/record.schema.json", "schemas/instruction_sample.schema.json"} <= set(files)
    card = (release / "README.md").read_text()
    assert card.startswith("---\nlicense: unknown\n")
    for expected in ("# tiny set 1.0.0", "| format | 11 | 1 | 10 | media_token_mismatch 1 |", "| image | 6 | 3 |",
                     "## Score distributions", "num_tokens", "## Recipe", "## Versions", "| webdataset |"):  # fmt: skip
        assert expected in card, expected


def test_release_again_is_byte_identical_and_resumes(released, tmp_path):
    run_dir, _ = released
    release = run_dir / "release"
    before = release_files(release)
    # from scratch, through the CLI
    shutil.move(release, tmp_path / "first")
    assert main(["release", str(run_dir)]) == 0
    assert release_files(release) == before
    # a killed release: one shard and its marker gone, one half-written temp file left behind
    victim = sorted(release.glob("*.tar"))[1]
    victim.unlink()
    (release / "done" / f"{victim.stem}.json").unlink()
    (release / f".{victim.name}.tmp-999").write_bytes(b"half")
    (release / "_SUCCESS.json").unlink()
    assert main(["release", str(run_dir)]) == 0
    assert release_files(release) == before
    # published to a folder: the same files
    assert main(["release", str(run_dir), "--out", str(tmp_path / "published")]) == 0
    assert release_files(tmp_path / "published") == before


def test_samples_rendered_as_ray_tasks_make_the_same_release(released, tmp_path, monkeypatch, caplog):
    import logging

    run_dir, _ = released
    release = run_dir / "release"
    before = release_files(release)
    plan_hashes = {p.name: json.loads(p.read_text())["plan_hash"] for p in (release / "done").glob("*.json")}
    shutil.move(release, tmp_path / "first")
    monkeypatch.setattr("curation.stages.release.TASKS_FROM_RECORDS", 1)  # tasks for the 10 samples here
    with caplog.at_level(logging.INFO, logger="curation"):
        assert main(["release", str(run_dir)]) == 0
    rendered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("release: rendered crawl shard")]
    assert len(rendered) == 3  # one task a crawl shard
    assert release_files(release) == before
    assert {p.name: json.loads(p.read_text())["plan_hash"] for p in (release / "done").glob("*.json")} == plan_hashes
    assert not (release / "_work" / "rendered").exists()


def test_publish_to_s3_matches_local(released, monkeypatch):
    import s3fs
    from moto.server import ThreadedMotoServer

    run_dir, _ = released
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):  # fmt: skip
        monkeypatch.setenv(var, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}, "anon": False}
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.mkdir("releases")
        url = "s3://releases/tiny/v1"
        assert (
            main(["release", str(run_dir), "--out", url, "--set", f"release.storage_options={json.dumps(options)}"])
            == 0
        )
        local = release_files(run_dir / "release")
        remote = {p[len("releases/tiny/v1/") :]: fs.cat_file(p) for p in fs.find("releases/tiny/v1")}
        assert remote.keys() == local.keys()
        assert all(remote[p] == local[p] for p in local)
        assert (run_dir / "release" / "published").is_dir()
    finally:
        server.stop()


def test_release_needs_format(tmp_path):
    media = write_media_folder(tmp_path / "media")
    config = make_config(media, ["crawl", "release"])
    run = crawl_by_hand(tmp_path / "run", config)
    with pytest.raises(ConfigError, match="format"):
        ReleaseStage(run.ctx).run("crawl")


def test_sample_json_is_compact_and_sorted(released):
    import tarfile

    run_dir, _ = released
    shard = sorted((run_dir / "release").glob("image-*.tar"))[0]
    with tarfile.open(shard) as tf:
        member = next(m for m in tf if m.name.endswith(".json"))
        raw = tf.extractfile(member).read()
        assert member.mtime == 946684800 and member.uname == "bigdata"
    assert raw == json.dumps(json.loads(raw), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def test_fast_validator_agrees_with_jsonschema(released):
    """The release checks samples with jsonschema-rs; jsonschema, the reference implementation, must agree on every
    released sample and on broken copies of them."""
    import copy

    import jsonschema
    import webdataset as wds
    from referencing import Registry, Resource

    from curation.schemas import load_schema, validator

    run_dir, _ = released
    registry = Registry().with_resources(
        (f"curation/{p.name}", Resource.from_contents(json.loads(p.read_text()))) for p in SCHEMA_DIR.glob("*.json")
    )
    reference = jsonschema.Draft202012Validator(load_schema("instruction_sample"), registry=registry)
    ours = validator("instruction_sample")
    samples = [json.loads(s["json"]) for s in wds.WebDataset(sorted(str(p) for p in (run_dir / "release").glob("*.tar")),
                                                             shardshuffle=False)]  # fmt: skip
    broken = []
    for sample in samples:
        for change in (
            lambda b: b.update(id="not-hex"),
            lambda b: b["record"].update(num_bytes="12"),
            lambda b: b.pop("conversations"),
            lambda b: b["conversations"][0].update(value=b["conversations"][0]["value"].split("\n", 1)[-1]),
            lambda b: b["conversations"].append({"from": "gpt", "value": "<image> again"}),
            lambda b: b["tokens"].update(input_ids=["1"]) if "tokens" in b else b.update(extra=1),
        ):
            b = copy.deepcopy(sample)
            change(b)
            broken.append(b)
    everything = samples + broken
    verdicts = [reference.is_valid(x) for x in everything]
    assert all(verdicts[: len(samples)]) and sum(verdicts) < len(everything) - len(samples)  # some copies are broken
    assert [ours.is_valid(x) for x in everything] == verdicts


def _formatted(tmp_path, media):
    from curation.ledger import assemble_ledger
    from curation.stages.format import FormatStage

    config = make_config(media, ["crawl", "format", "release"], release={"parallelism": 1})
    run = crawl_by_hand(tmp_path / "run", config)
    FormatStage(run.ctx).run("crawl")
    assemble_ledger(run.run_dir, ["crawl", "format"])
    return run


def test_unreleasable_records_are_rejected_with_a_reason(tmp_path):
    import tarfile

    from curation.ledger import assemble_ledger

    run = _formatted(tmp_path, write_media_folder(tmp_path / "media"))
    # the crawl shard's media no longer matches the sha256 its record promises
    shard = run.run_dir / "crawl" / "shards" / "00000.parquet"
    table = pq.read_table(shard).to_pylist()
    table[0]["sha256"] = "0" * 64
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(shard)), shard)
    # and the crawl tar lost the media of another record
    lost = f"{table[1]['uid']}.{table[1]['ext']}"
    tar_path = shard.with_suffix(".tar")
    with tarfile.open(tar_path) as src:
        members = [(m, src.extractfile(m).read()) for m in src if m.name != lost]
    assert len(members) == 3 * len(table) - 1
    with tarfile.open(tar_path, "w") as dst:
        for member, data in members:
            dst.addfile(member, io.BytesIO(data))
    summary = ReleaseStage(run.ctx).run("format")
    assert summary["reasons"] == {"checksum_mismatch": 1, "media_missing": 1} and summary["kept"] == 8
    counts = assemble_ledger(run.run_dir, ["crawl", "format", "release"])
    assert counts == {"input": 10, "kept": 8, "rejected": 2}
    rows = {r["uid"]: r for r in pq.read_table(run.run_dir / "ledger.parquet").to_pylist() if r["status"] == "rejected"}
    assert set(rows) == {table[0]["uid"], table[1]["uid"]}
    assert rows[table[0]["uid"]]["stage"] == "release" and "sha256" in rows[table[0]["uid"]]["detail"]
    assert rows[table[1]["uid"]]["reason"] == "media_missing" and lost in rows[table[1]["uid"]]["detail"]
    assert not {table[0]["uid"], table[1]["uid"]} & {r["key"] for r in index_rows(run.run_dir)}
    readme = (run.run_dir / "release" / "README.md").read_text()
    assert "| release | 10 | 2 | 8 | checksum_mismatch 1, media_missing 1 |" in readme, readme
    assert verify_release(run.run_dir / "release") == []


def test_an_empty_release_is_still_complete(tmp_path):
    from curation.ledger import assemble_ledger

    media = tmp_path / "media"
    media.mkdir()
    for i in range(2):
        (media / f"x{i}.png").write_bytes(png(i))
        (media / f"x{i}.txt").write_text("every caption says <image>")
    run = _formatted(tmp_path, media)
    summary = ReleaseStage(run.ctx).run("format")
    assert summary["input"] == summary["kept"] == 0
    assert assemble_ledger(run.run_dir, ["crawl", "format", "release"]) == {"input": 2, "kept": 0, "rejected": 2}
    manifest = json.loads((run.run_dir / "release" / "manifest.json").read_text())
    validate("manifest", manifest)
    assert manifest["counts"]["samples"] == 0 and verify_release(run.run_dir / "release") == []
