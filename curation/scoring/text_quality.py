"""Text-quality statistics of the caption, after datatrove's Gopher heuristics (Rae et al. 2021): word counts,
mean word length, symbol and alphabetic-word ratios, stop words, and n-gram repetition. Stored as numbers; the
filter recipe sets the thresholds (Gopher's own are for web pages, not one-line captions).

datatrove's English word tokenizer needs spaCy; captions need no more than a Unicode regex, which datatrove accepts
in place of a language (a ``WordTokenizer`` instance), so its word splitting and statistics helpers run as they are.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pyarrow as pa

from curation.scoring.base import Scorer, set_column

COLUMNS = {
    "text_words": pa.int32(),  # words (Gopher: non-symbol words)
    "text_chars": pa.int32(),
    "text_avg_word_length": pa.float64(),  # Gopher keeps 3..10
    "text_alpha_words_ratio": pa.float64(),  # words with a letter; Gopher keeps >= 0.8
    "text_symbol_ratio": pa.float64(),  # words made only of punctuation
    "text_stop_words": pa.int32(),  # distinct Gopher stop words present
    "text_type_token_ratio": pa.float64(),  # distinct words / words
    "text_top_2gram_ratio": pa.float64(),  # chars in the most frequent 2-gram / all chars (Gopher <= 0.2)
    "text_dup_5gram_ratio": pa.float64(),  # chars in repeated 5-grams / all chars (Gopher <= 0.15)
    "text_non_ascii_ratio": pa.float64(),
}


@lru_cache(maxsize=1)
def word_tokenizer():
    """A datatrove ``WordTokenizer`` splitting on Unicode words and punctuation runs."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    words = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+", re.UNICODE)

    class RegexWordTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return words.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in re.finditer(r"[^.!?]+[.!?]*", text)]

    return RegexWordTokenizer()


def text_stats(text: str) -> dict[str, float | int]:
    """The statistics of one caption (see :data:`COLUMNS`)."""
    from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
    from datatrove.utils.text import PUNCTUATION_SET, split_into_words

    words = split_into_words(text, word_tokenizer())
    n = len(words)
    non_symbol = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    chars = max(len(text), 1)
    lowered = [w.lower() for w in words]
    bigrams = get_n_grams(lowered, 2)
    return {
        "text_words": len(non_symbol),
        "text_chars": len(text),
        "text_avg_word_length": sum(len(w) for w in non_symbol) / len(non_symbol) if non_symbol else 0.0,
        "text_alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / n if n else 0.0,
        "text_symbol_ratio": (n - len(non_symbol)) / n if n else 0.0,
        "text_stop_words": len(set(STOP_WORDS) & set(lowered)),
        "text_type_token_ratio": len(set(lowered)) / n if n else 0.0,
        "text_top_2gram_ratio": find_top_duplicate(bigrams) / chars if bigrams else 0.0,
        "text_dup_5gram_ratio": find_all_duplicate(lowered, 5) / chars if n >= 5 else 0.0,
        "text_non_ascii_ratio": sum(ord(c) > 127 for c in text) / chars,
    }


class TextQualityScorer(Scorer):
    """Fills the ``text_*`` columns; no model, so it runs as plain Ray tasks."""

    name = "text_quality"
    schema = pa.schema(list(COLUMNS.items()))

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [text_stats(c or "") for c in batch.column("caption").to_pylist()]
        for name, type_ in COLUMNS.items():
            batch = set_column(batch, name, pa.array([s[name] for s in stats], type_))
        return batch


def text_quality_batch(batch: pa.Table) -> pa.Table:
    """Ray Data batch function form of :class:`TextQualityScorer`."""
    return TextQualityScorer()(batch)
