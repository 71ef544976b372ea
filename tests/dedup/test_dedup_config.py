"""DedupConfig: defaults are valid, problems name their key, and the shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from curation.config import ConfigError, DedupConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.quick


def test_defaults_are_valid():
    assert DedupConfig().validate() == []
    assert load_config(data={"input": {"path": "x"}}).dedup == DedupConfig()


def test_problems_name_their_keys():
    with pytest.raises(ConfigError) as e:
        load_config(
            data={"input": {"path": "x"}},
            overrides=[
                "dedup.methods=[exact,fuzzy]",
                "dedup.semantic_keep=middle",
                "dedup.semantic_eps=0",
                "dedup.image_max_bits=64",
                "dedup.caption_scope=everything",
                "dedup.decontaminate=/no/such/set",
                "dedup.bands=0",
            ],  # fmt: skip
        )
    text = str(e.value)
    for key in ("dedup.methods[1]", "dedup.semantic_keep", "dedup.semantic_eps", "dedup.image_max_bits",
                "dedup.caption_scope", "dedup.decontaminate", "dedup.bands"):  # fmt: skip
        assert key in text, key


def test_the_dedup_recipe_loads():
    config = load_config(ROOT / "pipelines" / "dedup.yaml")
    assert config.stages == ["crawl", "dedup"]
    assert config.dedup.caption_scope == "media"
