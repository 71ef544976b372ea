"""Test factories for the format and release stages: a small media folder, and a run directory whose crawl stage
is completed by hand (same layout as curation/stages/crawl.py writes), so these tests need neither the network
nor the crawler."""

from __future__ import annotations

import hashlib
import io
import json
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import load_config
from curation.fsutil import write_json
from curation.ledger import assemble_ledger, kept_row, rejected_row, write_part
from curation.runner import Run
from curation.schemas import RECORD_SCHEMA
from curation.stages.base import StageContext
from curation.stages.crawl import TAR_MTIME, CrawlStage


def png(seed: int, size: tuple[int, int] = (48, 32), fmt: str = "PNG") -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def wav(seed: int, seconds: float = 0.5, rate: int = 8000, channels: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    data = (rng.standard_normal(int(seconds * rate) * channels) * 3000).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return buf.getvalue()


def mp4(seed: int, frames: int = 6, fps: int = 6, size: tuple[int, int] = (32, 32)) -> bytes:
    import tempfile

    import av

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=fps)
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            for _ in range(frames):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        return path.read_bytes()


def write_media_folder(folder: Path, extra: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A few images (png and jpg), audio clips (wav) and videos (mp4), each with a caption beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    items: dict[str, tuple[bytes, str]] = {}
    for i in range(4):
        items[f"img{i}.png"] = (png(i, (48 + 8 * i, 32)), f"a noisy square picture number {i}")
    for i in range(2):
        items[f"photo{i}.jpg"] = (png(10 + i, (40, 60), "JPEG"), f"a tall noisy photo number {i}")
    for i in range(2):
        items[f"clip{i}.wav"] = (wav(20 + i, 0.5 + i, 8000, 1 + i), f"white noise recording {i}")
    for i in range(2):
        items[f"movie{i}.mp4"] = (mp4(30 + i), f"a flickering video {i}")
    items.update(extra or {})
    for name, (data, caption) in items.items():
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def tiny_tokenizer(folder) -> str:
    """A word-level tokenizer trained on a few sentences and saved like a trainer's (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["a noisy square picture number 0 1 2 3", "USER : ASSISTANT : what is shown in this image ?",
                 "the image is 48 pixels wide and 32 tall", "white noise recording video flickering"]  # fmt: skip
    tok.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")  # fmt: skip
    fast.save_pretrained(str(folder))
    return str(folder)


def probe(data: bytes, modality: str) -> dict[str, Any] | None:
    """What the crawl stage's probe records, for the media this module makes; None when it cannot be read."""
    try:
        if modality == "image":
            from PIL import Image

            img = Image.open(io.BytesIO(data))
            img.load()
            ext = {"JPEG": "jpg"}.get(img.format, img.format.lower())
            return {"ext": ext, "mime": Image.MIME[img.format], "width": img.width, "height": img.height}
        if modality == "audio":
            with wave.open(io.BytesIO(data)) as w:
                rate, frames = w.getframerate(), w.getnframes()
                return {"ext": "wav", "mime": "audio/wav", "sample_rate": rate, "channels": w.getnchannels(),
                        "duration_s": frames / rate}  # fmt: skip
        import av

        with av.open(io.BytesIO(data)) as container:
            s = container.streams.video[0]
            frames = sum(1 for _ in container.demux(s) if _.size)
            return {"ext": "mp4", "mime": "video/mp4", "width": s.codec_context.width,
                    "height": s.codec_context.height, "fps": float(s.average_rate), "num_frames": frames,
                    "duration_s": float(container.duration / 1e6)}  # fmt: skip
    except Exception:
        return None


def make_config(media: Path, stages: list[str], **sections: dict) -> Any:
    data = {"name": "test-release", "stages": stages, "input": {"path": str(media)}, "crawl": {"shard_size": 4}}
    data.update(sections)
    return load_config(data=data)


def crawl_by_hand(run_dir: Path, config) -> Run:
    """Ingest ``config.input`` into ``run_dir`` and complete its crawl stage without Ray or the network."""
    import webdataset as wds

    run = Run(config, run_dir)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    state = run.load_state()
    state["input"] = run.ingest(state)
    stage = CrawlStage(StageContext(run.run_dir, config))
    for path in sorted((run.run_dir / "input" / "records").glob("*.parquet")):
        shard = path.stem
        records, ledger = [], []
        with open(stage.dir / "shards" / f"{shard}.tar", "wb") if _mkdir(stage.dir / "shards") else None as f:
            sink = wds.TarWriter(f, mtime=TAR_MTIME)
            for row in pq.read_table(path).to_pylist():
                if row["input_error"]:
                    continue
                data = Path(row["local_path"]).read_bytes()
                meta = probe(data, row["modality"])
                if meta is None:
                    ledger.append(rejected_row(row["uid"], "crawl", "undecodable", row["local_path"]))
                    continue
                record = {k: None for k in RECORD_SCHEMA.names}
                record.update(uid=row["uid"], modality=row["modality"], source=row["source"], url=row["url"],
                              caption=row["caption"], shard=shard, sha256=hashlib.sha256(data).hexdigest(),
                              num_bytes=len(data), **meta)  # fmt: skip
                sink.write({"__key__": row["uid"], record["ext"]: data, "txt": row["caption"].encode(),
                            "json": json.dumps(record, sort_keys=True).encode()})  # fmt: skip
                records.append(record)
                ledger.append(kept_row(row["uid"], "crawl"))
            sink.close()
        pq.write_table(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), stage.dir / "shards" / f"{shard}.parquet")
        write_part(stage.ledger_path(shard), ledger)
        summary = {"input": len(ledger), "kept": len(records), "rejected": len(ledger) - len(records)}
        stage.mark_shard_done(shard, {**summary, "reasons": {}, "bytes": 0})
    write_json(stage.success_path, {"fingerprint": stage.fingerprint(), "summary": {}})
    state["stages"]["crawl"] = {"status": "complete"}
    state["counts"] = assemble_ledger(run.run_dir, ["crawl"])
    run.save_state(state)
    return run


def _mkdir(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return True
