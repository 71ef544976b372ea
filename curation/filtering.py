"""Filter recipes: load them (``filters/*.yaml``, found by folder scan) and apply them to stored scores.

A recipe mirrors :class:`curation.config.FilterConfig.Recipe`; loading collects every problem and raises one
:class:`~curation.config.ConfigError` naming the file and key (``filters/x.yaml: rules[2].min: ...``). Applying a
recipe is pure arithmetic over the score columns, so re-filtering a finished run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.config import ConfigError, FilterConfig, _build

REPO_ROOT = Path(__file__).resolve().parent.parent
FILTERS_DIR = REPO_ROOT / "filters"
Rule = FilterConfig.Rule
Recipe = FilterConfig.Recipe


def list_recipes(folder: Path = FILTERS_DIR) -> dict[str, Path]:
    """Shipped recipes by name (``filters/<name>.yaml``)."""
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def recipe_path(ref: str, relative_to: Path | None = None) -> Path:
    """A recipe reference (a path, relative to the including file or the working folder, or a name in
    ``filters/``) -> its file."""
    candidates = [Path(ref).expanduser()]
    if relative_to is not None:
        candidates.insert(0, relative_to.parent / ref)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    known = list_recipes()
    if ref in known:
        return known[ref]
    raise ConfigError([f"filter recipe {ref!r}: no such file, and not one of {', '.join(known) or 'none'} in "
                       f"{FILTERS_DIR}"])  # fmt: skip


@dataclass
class ResolvedRecipe:
    """A recipe with its includes expanded: every rule in order, and where each came from."""

    name: str
    version: int
    path: str
    rules: list[Rule] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "<file>: rules[i]" for each rule

    def fingerprint(self) -> str:
        data = [asdict(r) for r in self.rules]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path, "fingerprint": self.fingerprint(),
                "rules": [{**asdict(r), "from": s} for r, s in zip(self.rules, self.sources)]}  # fmt: skip


def load_recipe_file(path: Path) -> Recipe:
    """Parse and validate one recipe file (no includes); raises ConfigError naming the file and keys."""
    origin = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"{origin}: cannot read: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{origin}: the top level must be a mapping, got {type(data).__name__}"])
    problems: list[str] = []
    recipe = _build(Recipe, data, "", problems)
    if problems:
        raise ConfigError([f"{origin}: {p}" for p in problems])
    return recipe


def load_recipe(ref: str, extra_rules: list[Rule] | None = None) -> ResolvedRecipe:
    """Load a recipe by name or path, expand its includes (depth first, each file once), and append
    ``extra_rules`` (``filter.rules`` of the pipeline)."""
    path = recipe_path(ref)
    top = load_recipe_file(path)
    out = ResolvedRecipe(name=top.name, version=top.version, path=str(path))
    problems: list[str] = []

    def expand(p: Path, recipe: Recipe, stack: tuple[Path, ...]) -> None:
        for ref_ in recipe.include:
            try:
                sub_path = recipe_path(ref_, relative_to=p)
            except ConfigError as e:
                problems.append(f"{p}: include: {e.problems[0]}")
                continue
            if sub_path in stack:
                problems.append(f"{p}: include: {ref_!r} includes itself")
                continue
            try:
                expand(sub_path, load_recipe_file(sub_path), (*stack, sub_path))
            except ConfigError as e:
                problems.extend(e.problems)
        for i, rule in enumerate(recipe.rules):
            out.rules.append(rule)
            out.sources.append(f"{p.name}: rules[{i}]")

    expand(path, top, (path,))
    for i, rule in enumerate(extra_rules or []):
        out.rules.append(rule)
        out.sources.append(f"filter.rules[{i}]")
    if problems:
        raise ConfigError(problems)
    return out


# -- applying a recipe -------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v) if isinstance(v, str) else str(v)


@dataclass
class Verdict:
    """Why a record goes: the first failing rule's reason, and every failing rule's detail."""

    reason: str
    details: list[str]

    @property
    def detail(self) -> str:
        return "; ".join(self.details)


def percentile_thresholds(rules: list[Rule], rows: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """Per (rule index, modality): the signal value at the top/bottom X% cut among ``rows`` that have it."""
    out: dict[tuple[int, str], float] = {}
    for i, rule in enumerate(rules):
        pct = rule.top_percent if rule.top_percent is not None else rule.bottom_percent
        if pct is None:
            continue
        for modality in rule.modalities:
            values = [r[rule.signal] for r in rows if r["modality"] == modality and _present(r.get(rule.signal))]
            if not values:
                continue
            k = max(1, math.ceil(len(values) * pct / 100))
            ordered = sorted(values, reverse=rule.top_percent is not None)
            out[(i, modality)] = ordered[k - 1]
    return out


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def judge(row: dict[str, Any], rules: list[Rule], cuts: dict[tuple[int, str], float]) -> Verdict | None:
    """``None`` if ``row`` passes every rule that applies to its modality, else the :class:`Verdict`."""
    failed: list[tuple[str, str]] = []
    for i, rule in enumerate(rules):
        if row["modality"] not in rule.modalities:
            continue
        s = rule.signal
        v = row.get(s)
        if not _present(v):
            if rule.missing == "reject":
                failed.append((rule.reason or f"missing_{s}", f"no {s}"))
            continue
        if rule.one_of is not None and v not in rule.one_of:
            failed.append((rule.reason or f"unwanted_{s}", f"{s} {_fmt(v)} not in {rule.one_of}"))
        if rule.min is not None and v < rule.min:
            failed.append((rule.reason or f"low_{s}", f"{s} {_fmt(v)} < {_fmt(rule.min)}"))
        if rule.max is not None and v > rule.max:
            failed.append((rule.reason or f"high_{s}", f"{s} {_fmt(v)} > {_fmt(rule.max)}"))
        cut = cuts.get((i, row["modality"]))
        if cut is not None and rule.top_percent is not None and v < cut:
            failed.append((rule.reason or f"low_{s}", f"{s} {_fmt(v)} < {_fmt(cut)} (top {_fmt(rule.top_percent)}% "
                           f"of {row['modality']})"))  # fmt: skip
        if cut is not None and rule.bottom_percent is not None and v > cut:
            failed.append((rule.reason or f"high_{s}", f"{s} {_fmt(v)} > {_fmt(cut)} (bottom "
                           f"{_fmt(rule.bottom_percent)}% of {row['modality']})"))  # fmt: skip
    if not failed:
        return None
    return Verdict(failed[0][0], [d for _, d in failed])
