"""Pre-tokenizing conversations with a trainer's tokenizer, so training never re-tokenizes.

Two chat templates, as LLaVA trains: ``plain`` for projector pre-training (the media token, then the caption; the
instruction is dropped) and ``vicuna_v1`` for instruction tuning (``SYSTEM USER: q ASSISTANT: a</s>USER: ...``).
The media token becomes :data:`MEDIA_TOKEN_INDEX` (LLaVA's ``IMAGE_TOKEN_INDEX``, -200), where a trainer splices in
the projected media features; ``labels`` are the ids the loss is computed on, :data:`IGNORE_INDEX` elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from curation.instruct.conversation import MEDIA_TOKEN_RE, Turn

MEDIA_TOKEN_INDEX = -200
IGNORE_INDEX = -100
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a LOCAL folder (``save_pretrained`` layout); never downloads, never runs
    code shipped with it."""
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"format.tokenizer {path}: not a local folder (tokenizers are never downloaded)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def tokenizer_fingerprint(path: str) -> str:
    """sha256 over the tokenizer folder's files, so a release names exactly which tokenizer made its ids."""
    h = hashlib.sha256()
    folder = Path(path).expanduser()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode() + b"\x00" + file.read_bytes() + b"\x00")
    return h.hexdigest()


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """text -> token ids, without special tokens. A fast tokenizer's Rust backend is called directly, set as
    transformers sets it before each call of its own (no truncation, no padding, special tokens split as the
    tokenizer says): the same ids, without transformers' per-call wrapping (with the bootstrap LM's tokenizer, a
    record's pieces took 157 us this way, 212 through ``encode``). Any other tokenizer goes through its ``encode``, quietly: transformers warns
    of every text longer than ``model_max_length``, which says nothing about a piece of a conversation
    (``format.max_tokens`` is the limit that counts here)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer.encode(text, add_special_tokens=False, verbose=False)
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split:
        backend.encode_special_tokens = split
    return lambda text: backend.encode(text, add_special_tokens=False).ids


def _encode(encode: Callable[[str], list[int]], text: str) -> list[int]:
    """Token ids of ``text`` (by :func:`_encoder`), each media token replaced by :data:`MEDIA_TOKEN_INDEX`."""
    ids: list[int] = []
    pos = 0
    for match in MEDIA_TOKEN_RE.finditer(text):
        if match.start() > pos:
            ids += encode(text[pos : match.start()])
        ids.append(MEDIA_TOKEN_INDEX)
        pos = match.end()
    if pos < len(text):
        ids += encode(text[pos:])
    return ids


def segments(turns: list[Turn], template: str, system_prompt: str, eos: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces."""
    if template == "plain":
        media = MEDIA_TOKEN_RE.match(turns[0]["value"])
        return [(media.group() if media else "", False), (turns[1]["value"] + "\n", True)]
    if template == "vicuna_v1":
        pieces = []
        for i in range(0, len(turns) - 1, 2):
            prefix = f"{system_prompt} " if i == 0 else ""
            pieces.append((f"{prefix}USER: {turns[i]['value']} ASSISTANT:", False))
            pieces.append((f" {turns[i + 1]['value']}{eos}", True))
        return pieces
    raise ValueError(f"unknown chat template {template!r}")


def tokenize_conversation(
    tokenizer: Any, turns: list[Turn], template: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered with ``template`` (``plain`` or ``vicuna_v1``)."""
    eos = tokenizer.eos_token or "\n"
    encode = _encoder(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in segments(turns, template, system_prompt, eos):
        ids = _encode(encode, text)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels
