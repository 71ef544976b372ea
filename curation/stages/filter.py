"""Filter: apply a filter recipe (``filters/*.yaml``) to the scores the score stage stored.

No model loads: the recipe's absolute thresholds and percentiles (per modality, combinable) are evaluated over
the ledger's score columns, so ``curation filter RUN_DIR --recipe filters/laion.yaml`` re-filters a finished run
in seconds. Every rejected record names its failing signal and value (reason ``low_clip_score``, detail
``clip_score 0.12 < 0.28``). Outputs:

    filter/ledger/<shard>.parquet   every record the filter saw, kept or rejected with the reason
    filter/recipe.json              the resolved recipe (includes expanded), its fingerprint and the percentile cuts
    filter/done/<shard>.json        the shard is complete
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curation.config import ConfigError, PipelineConfig
from curation.fsutil import read_json, write_json
from curation.ledger import LedgerError, write_part
from curation.stages.base import Stage, log


class FilterStage(Stage):
    """Keep the records that meet every rule of the filter recipe."""

    name = "filter"
    order = 40
    config_sections = ("filter",)
    help = "apply a filter recipe (thresholds and percentiles per modality) to the stored scores"
    needs_ray = False

    def recipe(self):
        from curation.filtering import load_recipe

        return load_recipe(self.config.filter.recipe, self.config.filter.rules)

    def fingerprint(self) -> str:
        # the recipe file's rules, not only its name: editing filters/x.yaml must make a finished filter stale
        return f"{super().fingerprint()}-{self.recipe().fingerprint()}"

    def run(self, input_stage: str = "score") -> dict[str, Any]:
        """Judge every record the filter is given, column-wise over the ledger's score columns (a million records
        in seconds), and write a ledger part per crawl shard not yet done."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from curation.filtering import percentile_thresholds, verdicts

        recipe = self.recipe()
        records = self.kept_records(columns=["uid"])
        path = self.ctx.run_dir / "ledger.parquet"
        signals = sorted({r.signal for r in recipe.rules})
        missing = [s for s in signals if s not in pq.read_schema(path).names]
        if missing:
            where = {r.signal: src for r, src in zip(recipe.rules, recipe.sources)}
            raise ConfigError([f"{where[s]}: signal {s!r} was not computed in this run (is the score stage in "
                               f"`stages:`, with it in score.scorers?)" for s in missing])  # fmt: skip
        shards = list(records)
        uids = pa.chunked_array([c for s in shards for c in records[s].column("uid").chunks], pa.string())
        ledger = pq.read_table(path, columns=["uid", "modality", *signals])
        # the ledger's rows of the records given, in shard order (each is there: the ledger holds every input)
        rows = ledger.take(pc.index_in(uids, value_set=ledger.column("uid")))
        if rows.column("uid").null_count:
            raise LedgerError(f"{path}: {rows.column('uid').null_count} records the filter was given are not in it")
        cuts = percentile_thresholds(recipe.rules, rows)
        write_json(self.dir / "recipe.json", {**recipe.to_dict(), "cuts": [
            {"rule": recipe.sources[i], "modality": m, "signal": recipe.rules[i].signal, "value": v}
            for (i, m), v in sorted(cuts.items())]})  # fmt: skip
        reason, detail = verdicts(rows, recipe.rules, cuts)
        status = pc.if_else(pc.is_null(reason), "kept", "rejected")
        totals: Counter = Counter()
        reasons: Counter = Counter()
        start = 0
        for shard in shards:
            n = records[shard].num_rows
            if not self.is_shard_done(shard):
                part = pa.table({"uid": rows.column("uid").slice(start, n), "status": status.slice(start, n),
                                 "stage": pa.array([self.name] * n, pa.string()), "reason": reason.slice(start, n),
                                 "detail": detail.slice(start, n), "dup_of": pa.nulls(n, pa.string())})  # fmt: skip
                write_part(self.ledger_path(shard), part)
                counts = {c["values"]: c["counts"] for c in pc.value_counts(reason.slice(start, n)).to_pylist()
                          if c["values"] is not None}  # fmt: skip
                rejected = sum(counts.values())
                self.mark_shard_done(shard, {"input": n, "kept": n - rejected, "rejected": rejected,
                                             "reasons": dict(sorted(counts.items()))})  # fmt: skip
            start += n
            s = read_json(self.done_path(shard))
            totals.update({k: s[k] for k in ("input", "kept", "rejected")})
            reasons.update(s["reasons"])
        # per modality from the parts on disk (a resumed run's earlier shards included)
        by_modality: dict[str, dict[str, int]] = {}
        files = sorted((self.dir / "ledger").glob("*.parquet"))
        if files:
            parts = pa.concat_tables([pq.read_table(f, columns=["uid", "status"]) for f in files])
            at = pc.index_in(parts.column("uid"), value_set=rows.column("uid"))
            parts = parts.append_column("modality", rows.column("modality").take(at))
            for c in parts.group_by(["modality", "status"]).aggregate([([], "count_all")]).to_pylist():
                by_modality.setdefault(c["modality"], {})[c["status"]] = c["count_all"]
        log.info("filter: recipe %s v%d: %d kept, %d rejected %s", recipe.name, recipe.version, totals["kept"],
                 totals["rejected"], dict(reasons))  # fmt: skip
        return {**{k: totals[k] for k in ("input", "kept", "rejected")}, "reasons": dict(sorted(reasons.items())),
                "recipe": {"name": recipe.name, "version": recipe.version, "path": recipe.path,
                           "fingerprint": recipe.fingerprint()},
                "by_modality": {m: dict(sorted(c.items())) for m, c in sorted(by_modality.items())}}  # fmt: skip

    @classmethod
    def prepare_rerun(cls, run_dir: Path, config: PipelineConfig, reset_later: bool = False) -> None:
        """Before ``curation filter RUN_DIR --recipe X``: a finished filter stage with other settings is removed
        (it is recomputed from the stored scores in seconds). Later stages that consumed its output are reset
        only when ``reset_later`` is set; otherwise the re-filter is refused, naming them."""
        from curation.stages import STAGES, StageContext

        stage = cls(StageContext(Path(run_dir).resolve(), config))
        if not stage.success_path.is_file() or read_json(stage.success_path)["fingerprint"] == stage.fingerprint():
            if not stage.success_path.is_file() and stage.dir.exists():
                shutil.rmtree(stage.dir)  # a killed earlier attempt with maybe other settings: start clean
            return
        later = [n for n in config.stages if n in STAGES and STAGES[n].order > cls.order
                 and (stage.ctx.run_dir / n / "_SUCCESS.json").is_file()]  # fmt: skip
        if later and not reset_later:
            raise ConfigError([f"{run_dir}: stages {', '.join(later)} ran on the previous filter's output; pass "
                               "--reset-later to delete their outputs too (then `curation run` redoes them), or "
                               "re-filter a copy of the run"])  # fmt: skip
        for name in later:
            log.info("filter: resetting later stage %s (%s)", name, stage.ctx.run_dir / name)
            shutil.rmtree(stage.ctx.run_dir / name)
        log.info("filter: re-filtering %s with recipe %s", run_dir, config.filter.recipe)
        shutil.rmtree(stage.dir)
