"""Instruction pools: the human side of the conversations, per modality.

``BRIEF`` holds the short-description instructions of projector pre-training (LLaVA's stage-1 data pairs each
caption with one such instruction). ``CAPTION`` holds the instruction-tuning questions whose answer is the caption.
A record gets one entry of a pool, picked from its uid (:func:`pick`), so the same record always reads the same.
Never reorder a pool of a released version: the pick is by position.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

BRIEF: dict[str, tuple[str, ...]] = {
    "image": (
        "Describe the image briefly.",
        "Give a short description of the image.",
        "Summarize the image in one sentence.",
        "Provide a brief caption for this image.",
        "Write a concise description of the picture.",
        "Briefly describe what the photo shows.",
        "Share a short summary of the image.",
        "What does this image show? Answer briefly.",
        "Render a clear and concise summary of the photo.",
        "Describe the picture in a few words.",
        "Caption this image.",
        "Give a one-line description of the image.",
        "Write a terse caption for the picture.",
        "Offer a quick description of the image.",
    ),
    "video": (
        "Describe the video briefly.",
        "Give a short description of the video.",
        "Summarize the clip in one sentence.",
        "Provide a brief caption for this video.",
        "Write a concise description of the clip.",
        "Briefly describe what happens in the video.",
        "Share a short summary of the video.",
        "What does this video show? Answer briefly.",
        "Render a clear and concise summary of the clip.",
        "Describe the clip in a few words.",
        "Caption this video.",
        "Give a one-line description of the video.",
        "Write a terse caption for the clip.",
        "Offer a quick description of the video.",
    ),
    "audio": (
        "Describe the audio briefly.",
        "Give a short description of the sound.",
        "Summarize the recording in one sentence.",
        "Provide a brief caption for this audio clip.",
        "Write a concise description of the recording.",
        "Briefly describe what can be heard.",
        "Share a short summary of the audio.",
        "What does this recording contain? Answer briefly.",
        "Render a clear and concise summary of the sound.",
        "Describe the audio clip in a few words.",
        "Caption this recording.",
        "Give a one-line description of the sound.",
        "Write a terse caption for the audio.",
        "Offer a quick description of the recording.",
    ),
}

CAPTION: dict[str, tuple[str, ...]] = {
    "image": (
        "What is shown in this image?",
        "What do you see in the picture?",
        "Describe the contents of this image.",
        "Explain what this photo depicts.",
        "What is this a picture of?",
        "Tell me what the image shows.",
        "Can you describe this image?",
        "What does the picture depict?",
        "Write a caption that describes this image.",
        "Describe the main subject of this image.",
        "What can be seen in this photo?",
        "Give a caption for the picture.",
    ),
    "video": (
        "What is shown in this video?",
        "What happens in the clip?",
        "Describe the contents of this video.",
        "Explain what this clip depicts.",
        "What is this video about?",
        "Tell me what the video shows.",
        "Can you describe this video?",
        "What does the clip depict?",
        "Write a caption that describes this video.",
        "Describe the main subject of this video.",
        "What can be seen in this clip?",
        "Give a caption for the video.",
    ),
    "audio": (
        "What can be heard in this audio?",
        "What sound does this recording contain?",
        "Describe the contents of this audio clip.",
        "Explain what this recording captures.",
        "What is this sound?",
        "Tell me what the audio contains.",
        "Can you describe this recording?",
        "What does the audio clip sound like?",
        "Write a caption that describes this audio.",
        "Describe the main sound in this recording.",
        "What is audible in this clip?",
        "Give a caption for the recording.",
    ),
}


def pick(options: Sequence[T], uid: str, salt: str) -> T:
    """Deterministic choice keyed by ``uid``; ``salt`` keeps the choices for different purposes independent."""
    digest = hashlib.sha256(f"{salt}\x00{uid}".encode()).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


def order(options: Sequence[T], uid: str, salt: str) -> list[T]:
    """A deterministic permutation of ``options`` keyed by ``uid`` (for picking several without repeats)."""
    keys = [hashlib.sha256(f"{salt}\x00{uid}\x00{i}".encode()).digest() for i in range(len(options))]
    return [options[i] for i in sorted(range(len(options)), key=keys.__getitem__)]
