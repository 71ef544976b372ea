"""The dataset card (``README.md``) of a release: what is in it, how it was filtered, how to load it.

Everything in the card comes from the run (ledger, index, run.json), nothing from the clock or the machine's
paths beyond what the recipe names, so the same run gives the same card, byte for byte.
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.compute as pc
import yaml

TASKS = {"image": "image-to-text", "video": "video-text-to-text", "audio": "audio-text-to-text"}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def size_category(n: int) -> str:
    """Hugging Face's ``size_categories`` bucket."""
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]  # fmt: skip
    return next((label for bound, label in bounds if n < bound), "n>1T")


def funnel(ledger: pa.Table, stages: list[str], release_rejects: dict[str, int]) -> list[dict[str, Any]]:
    """One row per stage, in pipeline order: records in, rejected (by reason), kept. ``ledger`` is the run's
    ledger before the release; ``release_rejects`` the release's own reject reasons."""
    rows = ledger.select(["status", "stage", "reason"]).to_pylist()
    remaining = len(rows)
    out = []
    for stage in ["input", *stages]:
        reasons = Counter(r["reason"] for r in rows if r["status"] == "rejected" and r["stage"] == stage)
        if stage == "release":
            reasons = Counter(release_rejects)
        rejected = sum(reasons.values())
        if stage == "input" and not rejected:
            continue
        out.append({"stage": stage, "in": remaining, "rejected": rejected, "kept": remaining - rejected,
                    "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))})  # fmt: skip
        remaining -= rejected
    return out


def numeric_stats(column: pa.ChunkedArray) -> dict[str, float] | None:
    values = pc.drop_null(column.cast(pa.float64()))
    if len(values) == 0:
        return None
    qs = pc.quantile(values, q=list(QUANTILES), interpolation="linear").to_pylist()
    return {
        "n": len(values),
        "mean": pc.mean(values).as_py(),
        "min": pc.min(values).as_py(),
        **{f"p{int(q * 100)}": v for q, v in zip(QUANTILES, qs)},
        "max": pc.max(values).as_py(),
    }


def source_name(source: str, url: str | None) -> str:
    """Where a record came from, coarsely: the URL's host, or the list/shard file it was read from."""
    if url:
        return urlsplit(url).netloc or "(no host)"
    if ":" in source:
        return source.rsplit(":", 1)[0]
    return "local media folder"


def sources(ledger: pa.Table, released: set[str], top: int = 20) -> list[tuple[str, int, int]]:
    """(source, input records, released records), largest first."""
    total: Counter = Counter()
    kept: Counter = Counter()
    for uid, source, url in zip(*(ledger.column(c).to_pylist() for c in ("uid", "source", "url"))):
        name = source_name(source, url)
        total[name] += 1
        kept[name] += uid in released
    ordered = sorted(total, key=lambda s: (-total[s], s))
    return [(s, total[s], kept[s]) for s in ordered[:top]]


def _num(x: float) -> str:
    return f"{x:.4g}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_card(facts: dict[str, Any]) -> str:
    """The card's Markdown from the facts the release stage gathers (see ReleaseStage.card_facts)."""
    per_modality: dict[str, dict[str, int]] = facts["modalities"]
    total = sum(m["samples"] for m in per_modality.values())
    front = {
        "license": facts["license"],
        "pretty_name": facts["name"],
        "size_categories": [size_category(total)],
        "task_categories": sorted({TASKS[m] for m in per_modality}),
        "tags": ["multimodal", "llava", "webdataset", "instruction-tuning", *sorted(per_modality)],
    }
    out = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "", f"# {facts['name']} {facts['version']}", ""]
    if facts.get("description"):
        out += [facts["description"], ""]
    breakdown = ", ".join(f"{per_modality[m]['samples']} {m}" for m in sorted(per_modality))
    out += [
        f"{total} media-text samples ({breakdown})"
        " as LLaVA-style instruction data in webdataset shards, made by the `curation` pipeline. Every sample has a "
        "projector pre-training conversation (a brief-description instruction answered with the caption) and an "
        "instruction conversation.",
        "",
        "## Contents",
        "",
        _table(
            ["modality", "samples", "shards", "media bytes"],
            [[m, v["samples"], v["shards"], v["media_bytes"]] for m, v in sorted(per_modality.items())]
            + [["**total**", total, *(sum(v[k] for v in per_modality.values()) for k in ("shards", "media_bytes"))]],
        ),
        "",
        "Instruction generators: "
        + (", ".join(f"`{g}` {n}" for g, n in sorted(facts["generators"].items())) or "none")
        + ".",
        "",
        "## Filter funnel",
        "",
        "Every input record is accounted for in the run's ledger: kept, or rejected by one stage with a reason.",
        "",
        _table(
            ["stage", "in", "rejected", "kept", "reasons"],
            [
                [f["stage"], f["in"], f["rejected"], f["kept"], ", ".join(f"{r} {n}" for r, n in f["reasons"].items())]
                for f in facts["funnel"]
            ],
        ),
        "",
        f"Released: **{total}**.",
        "",
    ]
    if facts["scores"]:
        header = ["column", "records", "n", "mean", "min", *[f"p{int(q * 100)}" for q in QUANTILES], "max"]
        rows = []
        for column, by_scope in sorted(facts["scores"].items()):
            for scope, s in by_scope.items():
                if s is not None:
                    rows.append([column, scope, s["n"], *(_num(s[k]) for k in header[3:])])
        out += ["## Score distributions", "", "Numeric ledger columns, over every record that has one and over "
                "the released samples.", "", _table(header, rows), ""]  # fmt: skip
    out += ["## Sources", "", _table(["source", "input records", "released"], [list(s) for s in facts["sources"]]), ""]
    out += [
        "## Files",
        "",
        "- `<modality>-<ext>-NNNNNN.tar`: webdataset shards; each series holds one modality and file type, so "
        "every sample of a shard has the same members: `<key>.<ext>` (the media), `<key>.txt` (the caption), "
        "`<key>.json` (the sample: `id`, the media file name under `image`/`video`/`audio`, `conversations`, "
        "`pretrain_conversations`, `generator`, the crawled `record`"
        + (", `scores`" if facts["scores"] else "")
        + (", `tokens`" if facts["tokenizer"] else "")
        + ").",
        "- `index.parquet`: one row per sample: key, shard, modality, caption, metadata, scores, and the byte "
        "ranges of the sample (`offset`, `size`) and of its media (`media_offset`, `media_size`) in the shard.",
        "- `manifest.json`: every file with its size and sha256.",
        "- `schemas/`: the JSON Schemas the samples and the manifest follow.",
    ]
    if facts["exports"]:
        out.append("- `exports/`: " + ", ".join(f"`{p}`" for p in facts["exports"]) + " and `media/`.")
    series = [f"`{s}` ({n} shard{'s' if n != 1 else ''})" for s, n in sorted(facts["series"].items())]
    out += ["", "Shard series: " + ", ".join(series) + ".", ""]
    if facts["tokenizer"]:
        t = facts["tokenizer"]
        out += [
            "## Tokens",
            "",
            f"Pre-tokenized with `{t['name']}` (sha256 of its files `{t['sha256']}`): `tokens.input_ids`/`labels` "
            f"render `conversations` with the `{t['templates']['conversations']}` template and "
            f"`tokens.pretrain_input_ids`/`pretrain_labels` render `pretrain_conversations` with "
            f"`{t['templates']['pretrain_conversations']}`. `{t['media_token_index']}` marks where the media "
            f"features go; `{t['ignore_index']}` in labels marks positions the loss ignores.",
            "",
        ]
    out += [
        "## Loading",
        "",
        "```python",
        "import glob",
        "",
        "import webdataset as wds",
        'ds = wds.WebDataset(sorted(glob.glob("*.tar")), shardshuffle=False)  # every series',
        "",
        "import datasets  # HF infers one schema per dataset: one series per call; audio and video need torchcodec",
        f"for series in {sorted(facts['series'])}:",
        '    ds = datasets.load_dataset("webdataset", data_files={"train": f"{series}-*.tar"}, split="train")',
        "```",
        "",
    ]
    if "llava" in facts["export_kinds"]:
        out += ["LLaVA: `--data_path exports/llava_instruct.json --image_folder exports/media` "
                "(`exports/llava_pretrain.json` for projector pre-training). Items name their media under `image`, "
                "`video` or `audio`; an image-only trainer takes the `image` items.", ""]  # fmt: skip
    if "sharegpt" in facts["export_kinds"]:
        out += ["LLaMA-Factory: `dataset_dir: exports`, `dataset: "
                f"{facts['dataset_id']}_instruct` (described in `exports/dataset_info.json`).", ""]  # fmt: skip
    out += [
        "## Recipe",
        "",
        "The resolved pipeline configuration this release was made with:",
        "",
        "```yaml",
        yaml.safe_dump(facts["recipe"], sort_keys=True).strip(),
        "```",
        "",
        "## Versions",
        "",
        _table(["package", "version"], [[k, v] for k, v in sorted(facts["versions"].items())]),
        "",
    ]
    return "\n".join(out)
