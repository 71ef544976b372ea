"""The format stage: LLaVA-form conversations, media-token placement, generators, pre-tokenizing."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
from crawled_runs import crawl_by_hand, make_config, png, tiny_tokenizer, write_media_folder

from curation.config import ConfigError, load_config
from curation.instruct import (
    GENERATORS,
    IGNORE_INDEX,
    MEDIA_TOKEN_INDEX,
    MEDIA_TOKENS,
    instruction_conversation,
    load_tokenizer,
    media_token_problem,
    pretrain_conversation,
)
from curation.instruct.templates import BRIEF, CAPTION
from curation.ledger import assemble_ledger
from curation.release.shards import build_sample
from curation.schemas import validate
from curation.stages.base import StageContext
from curation.stages.format import FormatStage

IMAGE = {"uid": "0123456789abcdef", "modality": "image", "caption": "a red circle on grey", "width": 640, "height": 480}
VIDEO = {"uid": "00000000000000aa", "modality": "video", "caption": "a blue square moves", "width": 64, "height": 48,
         "duration_s": 3.2, "fps": 25.0, "num_frames": 80}  # fmt: skip
AUDIO = {"uid": "00000000000000bb", "modality": "audio", "caption": "a low hum", "duration_s": 75.0,
         "sample_rate": 16000, "channels": 2}  # fmt: skip


def formatted_run(tmp_path, **format_cfg):
    """A hand-crawled run with one caption that itself contains <image>, formatted."""
    media = write_media_folder(tmp_path / "media", {"sneaky.png": (png(99), "look: <image> inside a caption")})
    config = make_config(media, ["crawl", "format"], format=format_cfg)
    run = crawl_by_hand(tmp_path / "run", config)
    summary = FormatStage(run.ctx).run("crawl")
    counts = assemble_ledger(run.run_dir, ["crawl", "format"])
    return run.run_dir, summary, counts


@pytest.mark.quick
def test_pools_and_registry():
    assert set(GENERATORS) >= {"caption", "metadata_qa", "multi_turn"}
    for pool in (BRIEF, CAPTION):
        assert set(pool) == set(MEDIA_TOKENS)
        for modality, templates in pool.items():
            assert len(templates) >= 12 and len(set(templates)) == len(templates), modality
            assert not any("<" in t for t in templates)


@pytest.mark.quick
def test_picks_are_deterministic_and_varied():
    first = [pretrain_conversation({**IMAGE, "uid": f"{i:016x}"}) for i in range(60)]
    again = [pretrain_conversation({**IMAGE, "uid": f"{i:016x}"}) for i in range(60)]
    assert first == again
    assert len({c[0]["value"] for c in first}) >= 8  # the pool is actually used
    names = {instruction_conversation({**IMAGE, "uid": f"{i:016x}"}, list(GENERATORS))[0] for i in range(60)}
    assert names == set(GENERATORS)


@pytest.mark.quick
@pytest.mark.parametrize("record", [IMAGE, VIDEO, AUDIO], ids=lambda r: r["modality"])
def test_media_token_leads_the_first_human_turn_exactly_once(record):
    for generators in (["caption"], ["metadata_qa"], ["multi_turn"]):
        name, turns = instruction_conversation(record, generators)
        assert name == generators[0]
        token = MEDIA_TOKENS[record["modality"]]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith(f"{token}\n")
        assert sum(t["value"].count(token) for t in turns) == 1
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert media_token_problem(record["modality"], turns) is None
    assert len(instruction_conversation(record, ["multi_turn"])[1]) >= 4


@pytest.mark.quick
def test_metadata_questions_are_answered_from_the_record():
    def answers(record):
        return {q: a for q, a in _all_qa(record)}

    image = answers(IMAGE)
    assert image["What are the dimensions of this image?"] == "The image is 640 pixels wide and 480 pixels tall."
    assert "4:3" in image["What is the aspect ratio of this image?"]
    video = answers(VIDEO)
    assert video["How long is this clip?"] == "The clip is 3.2 seconds long."
    assert "25 frames per second" in video["What is the frame rate of this video?"]
    audio = answers(AUDIO)
    assert audio["How long is this recording?"] == "The recording is 1 minute 15 seconds long."
    assert "16000 Hz" in audio["What is the sample rate of this audio?"]
    assert "stereo" in audio["Is this recording mono or stereo?"]
    # nothing probed: metadata_qa falls back to the caption instead of inventing an answer
    bare = {"uid": "00000000000000cc", "modality": "image", "caption": "x", "width": None, "height": None}
    name, turns = instruction_conversation(bare, ["metadata_qa"])
    assert name == "caption" and turns[1]["value"] == "x"


def _all_qa(record):
    from curation.instruct.generators import metadata_pairs

    return metadata_pairs(record, "0")


@pytest.mark.quick
def test_a_second_media_token_is_a_mismatch():
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "an <image> tag"}]
    assert "2 <image> tokens" in media_token_problem("image", turns)
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a <video>"}]
    assert "<video>" in media_token_problem("image", turns)
    turns = [{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "a cat"}]
    assert "not at the start" in media_token_problem("image", turns)


@pytest.mark.quick
def test_stage_accounts_for_every_record_and_rejects_the_token_in_a_caption(tmp_path):
    run_dir, summary, counts = formatted_run(tmp_path)
    assert summary["input"] == summary["kept"] + summary["rejected"] == 11
    assert summary["reasons"] == {"media_token_mismatch": 1}
    ledger = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    (reject,) = [r for r in ledger if r["status"] == "rejected"]
    assert reject["stage"] == "format" and reject["reason"] == "media_token_mismatch"
    assert "caption contains <image>" in reject["detail"]
    rows = [r for p in sorted((run_dir / "format" / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(rows) == 10 and reject["uid"] not in {r["uid"] for r in rows}
    crawled = {
        r["uid"]: r for p in (run_dir / "crawl" / "shards").glob("*.parquet") for r in pq.read_table(p).to_pylist()
    }
    for row in rows:
        validate("instruction_sample", build_sample(crawled[row["uid"]], row, None))
        assert row["input_ids"] is None


@pytest.mark.quick
def test_pretokenized_with_a_local_tokenizer(tmp_path):
    path = tiny_tokenizer(tmp_path / "tok")
    run_dir, summary, _ = formatted_run(tmp_path, tokenizer=path)
    assert summary["tokenizer"]["path"] == path and len(summary["tokenizer"]["sha256"]) == 64
    tok = load_tokenizer(path)
    rows = [r for p in sorted((run_dir / "format" / "shards").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert rows
    for row in rows:
        # vicuna_v1 trains on " answer</s>" after each "USER: ... ASSISTANT:"; plain on the caption after the media
        for ids, labels, turns, answer_text in (
            (row["input_ids"], row["labels"], row["conversations"], lambda a: f" {a}{tok.eos_token}"),
            (row["pretrain_input_ids"], row["pretrain_labels"], row["pretrain_conversations"], lambda a: f"{a}\n"),
        ):
            assert len(ids) == len(labels) and ids.count(MEDIA_TOKEN_INDEX) == 1
            assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
            assert labels[ids.index(MEDIA_TOKEN_INDEX)] == IGNORE_INDEX
            # the loss sees exactly the answers (and their end-of-turn tokens), never the prompt or the media
            trained = [t for t in labels if t != IGNORE_INDEX]
            answers = [t["value"] for t in turns if t["from"] == "gpt"]
            assert trained == [i for a in answers for i in tok.encode(answer_text(a), add_special_tokens=False)]
            assert [i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX] == trained
    ledger = pq.read_table(run_dir / "ledger.parquet")
    assert "num_tokens" in ledger.column_names
    # too long for the trainer's context: rejected with a reason, not truncated
    run_dir2, summary2, counts2 = formatted_run(tmp_path / "short", tokenizer=path, max_tokens=20)
    assert summary2["reasons"].get("too_many_tokens", 0) >= 1
    assert counts2["input"] == counts2["kept"] + counts2["rejected"]


@pytest.mark.quick
def test_token_ids_are_transformers_own(tmp_path):
    """The Rust backend called directly gives the ids transformers' ``encode`` gives, also for a backend left
    truncating and padding, and for text that spells special tokens."""
    from curation.instruct.tokenize import _encoder
    from curation.models.text import minilm_path

    texts = ["USER : what is shown in this image ? ASSISTANT :", "a noisy square </s> picture <s> [PAD]",
             "Ünïcode  spaces\tand\nnewlines " * 30, ""]  # fmt: skip
    for path in (tiny_tokenizer(tmp_path / "tok"), str(minilm_path())):
        tok = load_tokenizer(path)
        expected = [tok.encode(t, add_special_tokens=False) for t in texts]
        assert max(map(len, expected)) > 20
        tok.backend_tokenizer.enable_truncation(4)
        tok.backend_tokenizer.enable_padding(length=64)
        assert [_encoder(tok)(t) for t in texts] == expected


@pytest.mark.slow
def test_shards_formatted_as_ray_tasks_equal_the_driver_s(tmp_path, ray_session, caplog, monkeypatch):
    monkeypatch.setattr("curation.stages.format.TASKS_FROM_RECORDS", 1)  # tasks for the 11 records here
    path = tiny_tokenizer(tmp_path / "tok")
    outputs = {}
    for parallelism in (1, None):  # the driver alone; a Ray task a shard, two at once
        with caplog.at_level(logging.INFO, logger="curation"):
            run_dir, summary, counts = formatted_run(tmp_path / f"p{parallelism}", tokenizer=path,
                                                     parallelism=parallelism)  # fmt: skip
        files = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in (run_dir / "format").rglob("*.parquet")}
        done = {
            p.name: {k: v for k, v in json.loads(p.read_text()).items() if k != "finished"}
            for p in (run_dir / "format" / "done").glob("*.json")
        }
        outputs[parallelism] = summary, counts, files, done
    tasks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("format: shard")]
    assert len(tasks) == 3 and tasks[-1].startswith("format: shard") and "(3/3)" in tasks[-1]
    assert len(outputs[1][3]) == 3 and len(outputs[1][2]) == 6  # three crawl shards: samples and ledger parts
    assert outputs[None] == outputs[1]


@pytest.mark.quick
def test_how_it_runs_is_not_what_it_writes(tmp_path):
    """format.parallelism and num_cpus leave a completed stage current; its other keys make it stale."""
    base = {"input": {"path": "x"}, "stages": ["crawl", "format"]}

    def fingerprint(**format_cfg):
        return FormatStage(StageContext(tmp_path, load_config(data={**base, "format": format_cfg}))).fingerprint()

    assert fingerprint() == fingerprint(parallelism=1, num_cpus=0.5)
    assert fingerprint() != fingerprint(seed=1)
    with pytest.raises(ConfigError) as err:
        load_config(data={**base, "format": {"parallelism": 0, "num_cpus": 0}})
    assert "format.parallelism" in str(err.value) and "format.num_cpus" in str(err.value)


@pytest.mark.quick
def test_tokenizers_are_local_only(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer("some-org/some-model")
    with pytest.raises(ConfigError) as err:
        load_config(data={"input": {"path": "x"}, "format": {"tokenizer": "hf://org/model", "generators": ["nope"]}})
    text = str(err.value)
    assert "format.tokenizer" in text and "format.generators[0]" in text
    with pytest.raises(ConfigError, match="max_tokens"):
        load_config(data={"input": {"path": "x"}, "format": {"max_tokens": 10}})
