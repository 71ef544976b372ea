"""Recipes: every shipped YAML loads and validates; errors are collected and name the key and the file."""

from pathlib import Path

import pytest
import yaml

from curation.config import ConfigError, PipelineConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "pipelines").glob("*.yaml"))

pytestmark = pytest.mark.quick


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_pipeline_recipe_validates(recipe):
    config = load_config(recipe)
    assert isinstance(config, PipelineConfig)
    assert config.stages
    # the YAML mirrors the dataclasses: every key it sets is one the config knows
    raw = yaml.safe_load(recipe.read_text())
    assert set(raw) <= set(config.to_dict())


def test_shipped_recipes_exist():
    assert {p.name for p in RECIPES} >= {"demo.yaml", "crawl.yaml"}


def test_overrides_are_typed_and_win():
    config = load_config(
        ROOT / "pipelines" / "demo.yaml",
        ["crawl.threads=3", "crawl.allow_private_addresses=false", "input.path=x.csv", "crawl.read_timeout_s=1"],
    )
    assert config.crawl.threads == 3
    assert config.crawl.allow_private_addresses is False
    assert config.input.path == "x.csv"
    assert config.crawl.read_timeout_s == 1.0 and isinstance(config.crawl.read_timeout_s, float)


def test_all_errors_are_reported_at_once_with_key_and_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "stages": ["crawl", "nosuchstage"],
                "input": {"format": "xml"},
                "crawl": {"threads": "many", "retries": -2, "typo": 1},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    problems = err.value.problems
    text = "\n".join(problems)
    assert all(p.startswith(str(recipe)) for p in problems)
    for key in ("stages[1]", "input.format", "input.path", "crawl.threads", "crawl.retries", "crawl.typo"):
        assert key in text, key
    assert len(problems) == 6


def test_bad_override_names_the_flag():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "pipelines" / "demo.yaml", ["crawl.threads=zero"])
    assert err.value.problems == ["--set: crawl.threads: expected int, got str 'zero'"]
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(ROOT / "pipelines" / "demo.yaml", ["crawl.threads"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_fingerprint_changes_with_the_section_only():
    a = load_config(ROOT / "pipelines" / "demo.yaml")
    b = load_config(ROOT / "pipelines" / "demo.yaml", ["crawl.threads=2"])
    assert a.section_fingerprint("input") == b.section_fingerprint("input")
    assert a.section_fingerprint("crawl") != b.section_fingerprint("crawl")
