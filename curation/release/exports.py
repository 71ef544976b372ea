"""Exports of a release for trainers that do not read webdataset: LLaVA's JSON lists and LLaMA-Factory's sharegpt
form, both next to one media folder (``exports/media/<key>.<ext>``, written by the shard writers).

    exports/llava_pretrain.json     [{"id", "image"|"video"|"audio": "<key>.<ext>", "conversations"}]  stage 1
    exports/llava_instruct.json     the same with the instruction conversations                         stage 2
    exports/sharegpt_pretrain.json  [{"messages": [{"role", "content"}], "images", "videos", "audios"}]
    exports/sharegpt_instruct.json
    exports/dataset_info.json       LLaMA-Factory's description of the two sharegpt files

LLaVA's ``--image_folder`` is ``exports/media``; LLaMA-Factory's ``dataset_dir`` is ``exports``. Each sharegpt
item has all three media lists (empty where unused), so every placeholder count matches its list's length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from curation.fsutil import atomic_path
from curation.release.shards import dumps

MEDIA_LISTS = {"image": "images", "video": "videos", "audio": "audios"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def llava_item(sample: dict[str, Any], conversations: str) -> dict[str, Any]:
    modality = sample["record"]["modality"]
    return {"id": sample["id"], modality: sample[modality], "conversations": sample[conversations]}


def sharegpt_item(sample: dict[str, Any], conversations: str) -> dict[str, Any]:
    modality = sample["record"]["modality"]
    item: dict[str, Any] = {
        "messages": [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in sample[conversations]]
    }
    for m, key in MEDIA_LISTS.items():
        item[key] = [f"media/{sample[modality]}"] if m == modality else []
    return item


def _write_json_list(path: Path, items: Iterable[dict[str, Any]]) -> None:
    """A JSON array written one item a line, so a large export never sits in memory whole."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"[")
        for i, item in enumerate(items):
            f.write(b"\n" if i == 0 else b",\n")
            f.write(dumps(item))
        f.write(b"\n]\n")


def write_exports(
    exports_dir: Path, samples: Callable[[], Iterator[dict[str, Any]]], kinds: list[str], dataset_name: str
) -> list[Path]:
    """Write the exports named in ``kinds`` (``llava``, ``sharegpt``); ``samples`` is a zero-argument callable
    returning an iterator of released samples in release order (each file takes one pass). Returns the files."""
    written = []
    for kind, make in (("llava", llava_item), ("sharegpt", sharegpt_item)):
        if kind not in kinds:
            continue
        for stage, conversations in (("pretrain", "pretrain_conversations"), ("instruct", "conversations")):
            path = exports_dir / f"{kind}_{stage}.json"
            _write_json_list(path, _mapped(samples(), make, conversations))
            written.append(path)
    if "sharegpt" in kinds:
        info = {
            f"{dataset_name}_{stage}": {
                "file_name": f"sharegpt_{stage}.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", **{v: v for v in MEDIA_LISTS.values()}},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            }
            for stage in ("pretrain", "instruct")
        }
        path = exports_dir / "dataset_info.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def _mapped(samples: Iterator[dict[str, Any]], make: Callable, conversations: str) -> Iterator[dict[str, Any]]:
    for sample in samples:
        yield make(sample, conversations)
