"""Filter recipes (typed, validated, shipped ones load), their semantics, and the filter stage on the real
pipeline: the default recipe against the sample's labelled caption defects, and re-filtering from stored scores."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sample_runs import ledger_by_id

from curation.config import ConfigError, FilterConfig
from curation.filtering import list_recipes, load_recipe, percentile_thresholds, verdicts

ROOT = Path(__file__).resolve().parents[2]
CAPTION_DEFECTS = ("mismatched_caption", "gibberish_caption", "non_english_caption")
Rule = FilterConfig.Rule


# -- recipes ----------------------------------------------------------------------------------------------------


@pytest.mark.quick
def test_every_shipped_filter_recipe_loads_and_validates():
    recipes = list_recipes()
    assert {"default", "laion", "datacomp"} <= set(recipes)
    for name, path in recipes.items():
        recipe = load_recipe(str(path))
        assert recipe.name == name, f"{path}: name {recipe.name!r} differs from the file name"
        assert recipe.rules and recipe.version >= 1
    laion = load_recipe("laion")
    assert [(r.signal, r.min, r.one_of) for r in laion.rules] == [("clip_score", 0.28, None), ("lang", None, ["en"])]


@pytest.mark.quick
def test_recipe_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nversion: one\ncolour: blue\nrules:\n"
        "  - {signal: clip_score, min: high}\n"
        "  - {signal: lang, min: 0.5}\n"
        "  - {signal: clip, min: 0.1}\n"
        "  - {signal: perplexity}\n"
        "  - {signal: clip_score, top_percent: 130, modalities: [image, text]}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(str(bad))
    text = str(e.value)
    for expected in (
        f"{bad}: version: expected int, got str 'one'",
        f"{bad}: colour: unknown key",
        f"{bad}: rules[0].min: expected float, got str 'high'",
        f"{bad}: rules[1].min: lang is categorical; use one_of",
        f"{bad}: rules[2].signal: unknown signal 'clip'",
        f"{bad}: rules[3].perplexity: no condition",
        f"{bad}: rules[4].modalities[1]: 'text' is not image, video or audio",
        f"{bad}: rules[4].top_percent: must be in (0, 100], got 130",
    ):
        assert expected in text, f"missing {expected!r} in:\n{text}"
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"name: loop\ninclude: [{loop}]\nrules: [{{signal: lang, one_of: [en]}}]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_recipe(str(loop))
    with pytest.raises(ConfigError, match="no such file, and not one of"):
        load_recipe("no-such-recipe")


@pytest.mark.quick
def test_includes_and_pipeline_rules_combine(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("name: extra\ninclude: [laion]\nrules:\n  - {signal: perplexity, max: 50}\n")
    recipe = load_recipe(str(extra), [Rule(signal="text_words", min=3)])
    assert [r.signal for r in recipe.rules] == ["clip_score", "lang", "perplexity", "text_words"]
    assert recipe.sources[0] == "laion.yaml: rules[0]" and recipe.sources[-1] == "filter.rules[0]"
    assert recipe.fingerprint() != load_recipe("laion").fingerprint()


def judged(rows: list[dict], rules: list, cuts: dict | None = None) -> dict[str, tuple[str, str] | None]:
    """uid -> (reason, detail) of the rejected rows, None for the kept ones, as :func:`verdicts` gives them."""
    table = pa.Table.from_pylist(rows)
    reason, detail = verdicts(table, rules, percentile_thresholds(rules, table) if cuts is None else cuts)
    return {u: None if r is None else (r, d) for u, r, d in zip(table["uid"].to_pylist(), reason.to_pylist(),
                                                                 detail.to_pylist())}  # fmt: skip


@pytest.mark.quick
def test_rules_thresholds_percentiles_and_reasons():
    rows = [{"uid": str(i), "modality": "image", "clip_score": s, "lang": "en", "perplexity": 10.0}
            for i, s in enumerate([0.10, 0.20, 0.28, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90])]  # fmt: skip
    rows.append({"uid": "a", "modality": "audio", "clip_score": 0.01, "lang": "de", "perplexity": 500.0})
    rows.append({"uid": "n", "modality": "image", "clip_score": None, "lang": "en", "perplexity": 10.0})
    rows.append({"uid": "nan", "modality": "image", "clip_score": float("nan"), "lang": None, "perplexity": 10.0})
    rules = [Rule(signal="clip_score", modalities=["image"], min=0.28), Rule(signal="lang", one_of=["en"]),
             Rule(signal="perplexity", max=100)]  # fmt: skip
    verdicts_ = judged(rows, rules)
    assert verdicts_["2"] is None  # the bound is inclusive
    assert verdicts_["0"] == ("low_clip_score", "clip_score 0.1 < 0.28")
    # the audio row: the image-only rule does not apply; the first failing rule names the reason, all are listed
    assert verdicts_["a"] == ("unwanted_lang", "lang 'de' not in ['en']; perplexity 500 > 100")
    assert verdicts_["n"] == ("missing_clip_score", "no clip_score")
    assert verdicts_["nan"] == ("missing_clip_score", "no clip_score; no lang")  # NaN is no score
    assert judged(rows, [Rule(signal="clip_score", min=0.28, missing="keep")])["n"] is None
    assert sum(v is None for v in verdicts_.values()) == 8

    top = [Rule(signal="clip_score", top_percent=30)]
    table = pa.Table.from_pylist(rows)
    cuts = percentile_thresholds(top, table)
    assert cuts == {(0, "image"): 0.70, (0, "audio"): 0.01}  # per modality; missing values take no part
    verdicts_ = judged(rows, top, cuts)
    assert [u for u, v in verdicts_.items() if v is None] == ["7", "8", "9", "a"]
    assert verdicts_["6"] == ("low_clip_score", "clip_score 0.6 < 0.7 (top 30% of image)")
    low = [Rule(signal="perplexity", bottom_percent=50, reason="rambling")]
    assert judged(rows, low)["a"] is None  # alone in its modality
    assert judged(rows[:1], low, {(0, "image"): 5.0})["0"][0] == "rambling"
    # columns without a single value (Arrow's null type), a table with no rows, and rules whose checks never apply
    unscored = pa.table({"uid": ["x"], "modality": ["image"], **dict.fromkeys(["clip_score", "lang", "perplexity"],
                                                                              pa.nulls(1))})  # fmt: skip
    assert [a.to_pylist() for a in verdicts(unscored, rules, {})] == [
        ["missing_clip_score"],
        ["no clip_score; no lang; no perplexity"],
    ]
    assert [a.to_pylist() for a in verdicts(table.slice(0, 0), rules, {})] == [[], []]
    assert judged(rows, [Rule(signal="clip_score", top_percent=10, missing="keep", modalities=["video"])]) == {
        r["uid"]: None for r in rows
    }


# -- on the real pipeline -----------------------------------------------------------------------------------------


def defect_rates(run_dir: Path, url_list: Path, labels: list[dict]) -> dict[tuple[str, str], tuple[int, int]]:
    """(modality, clean|defect) -> (records that reached the filter, records rejected after the crawl)."""
    ledger = ledger_by_id(run_dir, url_list)
    counts: Counter = Counter()
    for label in labels:
        row = ledger[label["id"]]
        if row["stage"] == "crawl" or label["expected_crawl_reason"]:
            continue
        key = (label["modality"], label["defect"] or "clean")
        counts[key + ("n",)] += 1
        counts[key + ("rejected",)] += row["status"] == "rejected"
    return {k[:2]: (counts[k[:2] + ("n",)], counts[k[:2] + ("rejected",)]) for k in counts}


@pytest.mark.slow
def test_default_recipe_rejects_caption_defects_and_keeps_clean_pairs(scored_run, sample_server, labels):
    run_dir, state = scored_run
    assert state["status"] == "complete"
    rates = defect_rates(run_dir, sample_server.url_lists["parquet"], labels)
    report = {f"{m}/{d}": f"{r}/{n} rejected" for (m, d), (n, r) in sorted(rates.items())}
    print(json.dumps(report, indent=1))
    for modality in ("image", "video", "audio"):
        n, rejected = rates[(modality, "clean")]
        assert n >= 40 and (n - rejected) / n >= 0.95, f"{modality}: kept {n - rejected}/{n} clean pairs: {report}"
        for defect in CAPTION_DEFECTS:
            n, rejected = rates[(modality, defect)]
            assert n >= 10 and rejected / n >= 0.90, f"{modality}/{defect}: rejected {rejected}/{n}: {report}"


@pytest.mark.slow
def test_rejects_name_the_failing_signal_and_value(scored_run):
    run_dir, _ = scored_run
    rows = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    rejected = [r for r in rows if r["stage"] == "filter"]
    assert rejected
    for r in rejected:
        signal = r["reason"].split("_", 1)[1]
        assert r["reason"] in ("low_clip_score", "unwanted_lang", "high_perplexity", "low_text_alpha_words_ratio")
        assert r["detail"].startswith(signal), r
    recipe = json.loads((run_dir / "filter" / "recipe.json").read_text())
    assert recipe["name"] == "default" and len(recipe["rules"]) >= 4


@pytest.mark.slow
def test_refilter_from_stored_scores_in_seconds_without_models(scored_run, tmp_path, monkeypatch, capsys):
    import curation.models.clip
    import curation.models.hf
    import curation.runner
    from curation.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(scored_run[0], run_dir)
    before = pq.read_table(run_dir / "ledger.parquet").to_pylist()

    def no_models(*_a, **_k):
        raise AssertionError("re-filtering must not load a model")

    for module, name in ((curation.models.clip, "load_clip"), (curation.models.hf, "load_clap"),
                         (curation.models.hf, "load_causal_lm")):  # fmt: skip
        monkeypatch.setattr(module, name, no_models)

    def no_ray(*_a, **_k):
        raise AssertionError("re-filtering must not start Ray")

    monkeypatch.setattr(curation.runner, "init_ray", no_ray)
    # a dry run first: it prints what the recipe would keep and changes nothing
    files = {f: f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()}
    capsys.readouterr()
    assert main(["filter", str(run_dir), "--recipe", "datacomp", "--dry-run"]) == 0
    preview = capsys.readouterr().out
    assert main(["filter", str(run_dir), "--recipe", "datacomp", "--dry-run", "--json"]) == 0
    preview_json = json.loads(capsys.readouterr().out)
    assert {f: f.read_bytes() for f in sorted(run_dir.rglob("*")) if f.is_file()} == files
    started = time.time()
    assert main(["filter", str(run_dir), "--recipe", str(ROOT / "filters" / "datacomp.yaml")]) == 0
    assert time.time() - started < 30
    after = pq.read_table(run_dir / "ledger.parquet").to_pylist()
    scored = [r for r in after if r["stage"] not in ("input", "crawl", "score")]
    for modality in ("image", "video", "audio"):
        mine = [r for r in scored if r["modality"] == modality]
        kept = sum(r["status"] == "kept" for r in mine)
        assert 0.3 * len(mine) <= kept <= 0.3 * len(mine) + 3, (modality, kept, len(mine))
    given = [r for r in after if r["status"] == "kept" or r["stage"] == "filter"]
    kept = sum(r["status"] == "kept" for r in given)
    assert f"{len(given)} records given to the filter: {kept} would be kept, {len(given) - kept} rejected" in preview
    assert "cut: clip_score" in preview and "now: recipe default v1" in preview, preview
    by_modality = {
        m: sum(r["status"] == "kept" for r in given if r["modality"] == m) for m in ("image", "video", "audio")
    }
    assert {m: c["kept"] for m, c in preview_json["by_modality"].items()} == by_modality
    assert preview_json["recipe"]["name"] == "datacomp" and len(preview_json["cuts"]) == 3
    # scores are untouched: only decisions changed
    assert [r["clip_score"] for r in after] == [r["clip_score"] for r in before]
    run_json = json.loads((run_dir / "run.json").read_text())
    assert run_json["config"]["filter"]["recipe"].endswith("datacomp.yaml")
    assert run_json["stages"]["score"]["status"] == "complete"

    # and back: the same recipe gives the same ledger, byte for byte in content
    assert main(["filter", str(run_dir), "--recipe", "default"]) == 0
    assert pq.read_table(run_dir / "ledger.parquet").to_pylist() == before
    capsys.readouterr()


@pytest.mark.slow
def test_refilter_refuses_to_orphan_later_stages(scored_run, tmp_path):
    from curation.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(scored_run[0], run_dir)
    state = json.loads((run_dir / "run.json").read_text())
    state["config"]["stages"] = ["crawl", "score", "filter", "format"]
    (run_dir / "run.json").write_text(json.dumps(state))
    (run_dir / "format").mkdir()
    (run_dir / "format" / "_SUCCESS.json").write_text("{}")
    assert main(["filter", str(run_dir), "--recipe", "laion"]) == 2  # refused, naming format
    assert (run_dir / "format" / "_SUCCESS.json").is_file()
    assert main(["filter", str(run_dir), "--recipe", "laion", "--reset-later"]) == 0
    assert not (run_dir / "format").exists()
    reasons = Counter(r["reason"] for r in pq.read_table(run_dir / "ledger.parquet").to_pylist())
    assert reasons["unwanted_lang"] > 0  # laion: English only; its 0.28 suits real CLIP, not the tiny model
