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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


def _signal(table: pa.Table, name: str) -> pa.ChunkedArray:
    """A score column of ``table``; one with no value at all (Arrow's null type) as the signal's own type."""
    column = table.column(name)
    if pa.types.is_null(column.type):
        from curation.scoring import SIGNALS

        column = column.cast(SIGNALS[name])
    return column


def _present(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Which values of a score column count as present: not null, and for a float column not NaN."""
    present = pc.is_valid(column)
    if pa.types.is_floating(column.type):
        present = pc.and_(present, pc.fill_null(pc.invert(pc.is_nan(column)), False))
    return _mask(present)


def _mask(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as a numpy mask, null as False."""
    return np.asarray(pc.fill_null(values, False), dtype=bool)


def percentile_thresholds(rules: list[Rule], table: pa.Table) -> dict[tuple[int, str], Any]:
    """Per (rule index, modality): the signal value at the top/bottom X% cut among the rows of ``table`` (columns
    ``modality`` and the rules' signals) that have it."""
    out: dict[tuple[int, str], Any] = {}
    modality = table.column("modality")
    for i, rule in enumerate(rules):
        pct = rule.top_percent if rule.top_percent is not None else rule.bottom_percent
        if pct is None:
            continue
        column = _signal(table, rule.signal)
        present = _present(column)
        for m in rule.modalities:
            values = np.sort(column.filter(pa.array(present & _mask(pc.equal(modality, m)))).to_numpy())
            if not len(values):
                continue
            k = max(1, math.ceil(len(values) * pct / 100))
            out[(i, m)] = (values[-k] if rule.top_percent is not None else values[k - 1]).item()
    return out


def verdicts(table: pa.Table, rules: list[Rule], cuts: dict[tuple[int, str], Any]) -> tuple[pa.Array, pa.Array]:
    """Every row's verdict under ``rules``, column-wise: ``(reason, detail)``, two string arrays that are null
    where the row passes every rule that applies to its modality. A rejected row's reason is its first failing
    check's (a rule's checks in the order: missing, one_of, min, max, percentile cut), its detail every failing
    check's value and bound, joined by ``; `` (``clip_score 0.12 < 0.28; lang 'de' not in ['en']``).
    ``cuts`` are :func:`percentile_thresholds`' values over the same rows."""
    n = table.num_rows
    modality = table.column("modality")
    # (failing rows, reason, signal, bound): a failing row's detail is "<signal> <value><bound>" ("no <signal>")
    checks: list[tuple[np.ndarray, str, str, str | None]] = []
    for i, rule in enumerate(rules):
        s = rule.signal
        column = _signal(table, s)
        applies = _mask(pc.is_in(modality, value_set=pa.array(rule.modalities, pa.string())))
        present = _present(column)
        if rule.missing == "reject":
            checks.append((applies & ~present, rule.reason or f"missing_{s}", s, None))
        live = applies & present
        if rule.one_of is not None:
            allowed = _mask(pc.is_in(column, value_set=pa.array(rule.one_of, column.type)))
            checks.append((live & ~allowed, rule.reason or f"unwanted_{s}", s, f" not in {rule.one_of}"))
        if rule.min is not None:
            checks.append((live & _mask(pc.less(column, rule.min)), rule.reason or f"low_{s}", s,
                           f" < {_fmt(rule.min)}"))  # fmt: skip
        if rule.max is not None:
            checks.append((live & _mask(pc.greater(column, rule.max)), rule.reason or f"high_{s}", s,
                           f" > {_fmt(rule.max)}"))  # fmt: skip
        for m in rule.modalities:  # one cut a modality: a row meets at most one of these checks
            cut = cuts.get((i, m))
            if cut is None:
                continue
            here = live & _mask(pc.equal(modality, m))
            if rule.top_percent is not None:
                checks.append((here & _mask(pc.less(column, cut)), rule.reason or f"low_{s}", s,
                               f" < {_fmt(cut)} (top {_fmt(rule.top_percent)}% of {m})"))  # fmt: skip
            else:
                checks.append((here & _mask(pc.greater(column, cut)), rule.reason or f"high_{s}", s,
                               f" > {_fmt(cut)} (bottom {_fmt(rule.bottom_percent)}% of {m})"))  # fmt: skip
    first = np.full(n, -1, np.int64)  # each row's first failing check
    detail: list[str | None] = [None] * n
    for c, (failing, _, signal, bound) in enumerate(checks):
        rows = np.flatnonzero(failing)
        first[rows[first[rows] < 0]] = c
        if bound is None:
            texts = [f"no {signal}"] * len(rows)
        else:  # Python for the failing values only
            values = _signal(table, signal).take(pa.array(rows)).to_pylist()
            texts = [f"{signal} {_fmt(v)}{bound}" for v in values]
        for r, t in zip(rows.tolist(), texts):
            detail[r] = t if detail[r] is None else f"{detail[r]}; {t}"
    reasons = pa.array([reason for _, reason, _, _ in checks], pa.string())
    return reasons.take(pa.array(first, mask=first < 0)), pa.array(detail, pa.string())
