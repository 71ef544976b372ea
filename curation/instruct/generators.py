"""Instruction generators: each turns a kept record into question-answer pairs about its media.

A generator answers only from what the record knows (its caption and probed metadata), so nothing it writes is
invented. The registry :data:`GENERATORS` is built from the classes of this module: adding a generator is adding
a class with a ``name``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

from curation.instruct.templates import CAPTION, order, pick

QAPair = tuple[str, str]
Record = dict[str, Any]


class InstructionGenerator:
    """Base class: ``generate`` returns (question, answer) pairs, or None when it has nothing to ask."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""

    def generate(self, record: Record, salt: str) -> list[QAPair] | None:
        raise NotImplementedError


class CaptionGenerator(InstructionGenerator):
    """One turn: a question from the modality's caption pool, answered with the caption."""

    name = "caption"
    help = "a question from a pool of caption prompts, answered with the caption"

    def generate(self, record: Record, salt: str) -> list[QAPair] | None:
        question = pick(CAPTION[record["modality"]], record["uid"], f"{salt}:caption")
        return [(question, record["caption"].strip())]


# -- questions answered from probed metadata -----------------------------------------------------------------
def _seconds(value: float) -> str:
    if value < 60:
        rounded = round(value, 1)
        return "1 second" if rounded == 1 else f"{rounded:g} seconds"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [(hours, "hour"), (minutes, "minute"), (seconds, "second")]
    return " ".join(f"{n} {unit}{'' if n == 1 else 's'}" for n, unit in parts if n)


def _present(record: Record, *keys: str) -> bool:
    return all(record.get(k) is not None and record.get(k) > 0 for k in keys)


def _dimensions(noun: str) -> Callable[[Record], QAPair | None]:
    def ask(r: Record) -> QAPair | None:
        if not _present(r, "width", "height"):
            return None
        return (
            f"What are the dimensions of this {noun}?",
            f"The {noun} is {r['width']} pixels wide and {r['height']} pixels tall.",
        )

    return ask


def _orientation(noun: str) -> Callable[[Record], QAPair | None]:
    def ask(r: Record) -> QAPair | None:
        if not _present(r, "width", "height"):
            return None
        w, h = r["width"], r["height"]
        shape = "landscape" if w > h else "portrait" if h > w else "square"
        answer = f"The {noun} is square ({w}x{h})." if shape == "square" else f"It is in {shape} orientation ({w}x{h})."
        return f"Is this {noun} in portrait or landscape orientation?", answer

    return ask


def _aspect_ratio(noun: str) -> Callable[[Record], QAPair | None]:
    def ask(r: Record) -> QAPair | None:
        if not _present(r, "width", "height"):
            return None
        w, h = r["width"], r["height"]
        g = math.gcd(w, h)
        ratio = f"{w // g}:{h // g}" if max(w, h) // g <= 32 else f"about {w / h:.2f}:1"
        return f"What is the aspect ratio of this {noun}?", f"The aspect ratio is {ratio} ({w}x{h} pixels)."

    return ask


def _duration(noun: str) -> Callable[[Record], QAPair | None]:
    def ask(r: Record) -> QAPair | None:
        if not _present(r, "duration_s"):
            return None
        return f"How long is this {noun}?", f"The {noun} is {_seconds(r['duration_s'])} long."

    return ask


def _frame_rate(r: Record) -> QAPair | None:
    if not _present(r, "fps"):
        return None
    return "What is the frame rate of this video?", f"The video plays at {round(r['fps'], 2):g} frames per second."


def _frame_count(r: Record) -> QAPair | None:
    if not _present(r, "num_frames"):
        return None
    return "How many frames does this video have?", f"The video has {r['num_frames']} frames."


def _sample_rate(r: Record) -> QAPair | None:
    if not _present(r, "sample_rate"):
        return None
    sr = r["sample_rate"]
    return "What is the sample rate of this audio?", f"The audio is sampled at {sr} Hz ({sr / 1000:g} kHz)."


def _channels(r: Record) -> QAPair | None:
    if not _present(r, "channels"):
        return None
    n = r["channels"]
    kind = {1: "mono (1 channel)", 2: "stereo (2 channels)"}.get(n, f"multichannel ({n} channels)")
    return "Is this recording mono or stereo?", f"The recording is {kind}."


METADATA_QUESTIONS: dict[str, tuple[Callable[[Record], QAPair | None], ...]] = {
    "image": (_dimensions("image"), _orientation("image"), _aspect_ratio("image")),
    "video": (_duration("clip"), _dimensions("video"), _frame_rate, _frame_count, _orientation("video")),
    "audio": (_duration("recording"), _sample_rate, _channels),
}


def metadata_pairs(record: Record, salt: str) -> list[QAPair]:
    """Every metadata question the record can answer, in a deterministic per-record order."""
    asked = (ask(record) for ask in order(METADATA_QUESTIONS[record["modality"]], record["uid"], f"{salt}:meta"))
    return [pair for pair in asked if pair is not None]


class MetadataQAGenerator(InstructionGenerator):
    """One turn: a question the probed metadata answers (dimensions, duration, frame rate, sample rate ...)."""

    name = "metadata_qa"
    help = "one question answered from the record's width/height/duration/fps/sample rate"

    def generate(self, record: Record, salt: str) -> list[QAPair] | None:
        pairs = metadata_pairs(record, salt)
        return pairs[:1] or None


class MultiTurnGenerator(InstructionGenerator):
    """Several turns about one media item: the caption question first, then up to ``max_questions`` metadata
    questions."""

    name = "multi_turn"
    help = "the caption turn followed by up to two metadata questions"
    max_questions: ClassVar[int] = 2

    def generate(self, record: Record, salt: str) -> list[QAPair] | None:
        pairs = metadata_pairs(record, salt)[: self.max_questions]
        if not pairs:
            return None
        return CaptionGenerator().generate(record, salt) + pairs


GENERATORS: dict[str, type[InstructionGenerator]] = {
    cls.name: cls
    for cls in list(globals().values())
    if isinstance(cls, type) and issubclass(cls, InstructionGenerator) and cls.name
}
