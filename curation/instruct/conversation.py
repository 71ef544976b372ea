"""LLaVA-form conversations and the media-token rule.

A conversation is a list of ``{"from": "human"|"gpt", "value": str}`` turns. The media token (``<image>``,
``<video>``, ``<audio>``) goes where LLaVA puts it: at the start of the first human turn, followed by a newline.
Exactly one media token per media item: a conversation whose text carries another one (a caption that itself says
``<image>``) would make a trainer splice the features in twice or count placeholders wrong, so it is rejected.
"""

from __future__ import annotations

import re
from typing import Any

from curation.instruct.generators import GENERATORS, QAPair
from curation.instruct.templates import BRIEF, pick

MEDIA_TOKENS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
MEDIA_TOKEN_RE = re.compile("|".join(re.escape(t) for t in MEDIA_TOKENS.values()))
FALLBACK_GENERATOR = "caption"

Turn = dict[str, str]


class FormatReject(Exception):
    """A record that cannot become a training sample; ``reason`` is its ledger code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def build_conversation(modality: str, pairs: list[QAPair]) -> list[Turn]:
    """Turns from question-answer pairs, the media token leading the first human turn."""
    turns: list[Turn] = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{MEDIA_TOKENS[modality]}\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def media_token_problem(modality: str, turns: list[Turn], media_items: int = 1) -> str | None:
    """Why ``turns`` break the one-token-per-media-item rule, or None when they keep it."""
    found = [(i, m.group()) for i, turn in enumerate(turns) for m in MEDIA_TOKEN_RE.finditer(turn["value"])]
    token = MEDIA_TOKENS[modality]
    ours = sum(1 for _, t in found if t == token)
    others = sorted({t for _, t in found if t != token})
    if others:
        return f"text contains {', '.join(others)} in a {modality} sample"
    if ours != media_items:
        return f"{ours} {token} tokens for {media_items} {modality} item{'s' if media_items != 1 else ''}"
    if not turns or turns[0]["from"] != "human" or not turns[0]["value"].startswith(f"{token}\n"):
        return f"{token} is not at the start of the first human turn"
    return None


def pretrain_conversation(record: dict[str, Any], seed: int = 0) -> list[Turn]:
    """Projector pre-training: a brief-description instruction and the caption (LLaVA's stage-1 form)."""
    instruction = pick(BRIEF[record["modality"]], record["uid"], f"{seed}:brief")
    return build_conversation(record["modality"], [(instruction, record["caption"].strip())])


def instruction_conversation(record: dict[str, Any], generators: list[str], seed: int = 0) -> tuple[str, list[Turn]]:
    """(generator name, turns): the record's generator is picked from ``generators`` by uid; one with nothing to
    ask about this record (no metadata) falls back to ``caption``."""
    name = pick(generators, record["uid"], f"{seed}:generator")
    pairs = GENERATORS[name]().generate(record, str(seed))
    if pairs is None:
        name = FALLBACK_GENERATOR
        pairs = GENERATORS[name]().generate(record, str(seed))
    return name, build_conversation(record["modality"], pairs)


def check_record(record: dict[str, Any]) -> None:
    """Raise :class:`FormatReject` for records no conversation can be made from."""
    caption = record.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise FormatReject("empty_caption", f"{record['uid']}: the caption is empty")
    if record.get("modality") not in MEDIA_TOKENS:
        raise FormatReject("unknown_modality", f"{record['uid']}: modality {record.get('modality')!r}")


def check_conversation(record: dict[str, Any], turns: list[Turn], what: str) -> None:
    problem = media_token_problem(record["modality"], turns)
    if problem:
        in_caption = sorted(set(MEDIA_TOKEN_RE.findall(record["caption"])))
        where = f"the caption contains {', '.join(in_caption)}: " if in_caption else ""
        raise FormatReject("media_token_mismatch", f"{record['uid']} ({what}): {where}{problem}")
