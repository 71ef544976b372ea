"""Scorers: one signal family a file, each a Ray Data actor (one model load per actor, batched) or task.

- :class:`~curation.scoring.clip_similarity.ClipSimilarityScorer`: image-text and video-text (open_clip)
- :class:`~curation.scoring.clap_similarity.ClapSimilarityScorer`: audio-text (CLAP)
- :class:`~curation.scoring.perplexity.PerplexityScorer`: caption perplexity (causal LM)
- :class:`~curation.scoring.language.LanguageIdScorer`: language id (fastText lid.176)
- :class:`~curation.scoring.text_quality.TextQualityScorer`: datatrove's Gopher text statistics
"""

from __future__ import annotations

import pyarrow as pa

__all__ = ["SIGNALS", "score_schema"]


def score_schema(scorers: list[str]) -> pa.Schema:
    """The ledger columns the enabled ``scorers`` (``score.scorers``) fill, in a fixed order."""
    from curation.scoring.base import MEDIA_SCHEMA
    from curation.scoring.language import LanguageIdScorer
    from curation.scoring.perplexity import PerplexityScorer
    from curation.scoring.text_quality import TextQualityScorer

    fields: list[pa.Field] = []
    if {"image_text", "video_text", "audio_text"} & set(scorers):
        fields += list(MEDIA_SCHEMA)
    for cls in (PerplexityScorer, LanguageIdScorer, TextQualityScorer):
        if cls.name in scorers:
            fields += list(cls.schema)
    return pa.schema(fields)


def _signals() -> dict[str, pa.DataType]:
    return {f.name: f.type for f in score_schema(["image_text", "perplexity", "language", "text_quality"])}


SIGNALS: dict[str, pa.DataType] = _signals()  # every score column a filter recipe can name
