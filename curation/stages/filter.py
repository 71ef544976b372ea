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
from pathlib import Path
from typing import Any

import pyarrow as pa
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

    def _judge(self, uids: pa.ChunkedArray):
        """The recipe's verdicts on the records ``uids``, column-wise over the ledger's score columns (a million
        records in a second or two): ``(recipe, rows, cuts, reason, detail)``, ``rows`` the ledger's uid, modality
        and signals of those records in their order, ``reason`` and ``detail`` null for the kept ones."""
        import pyarrow.compute as pc

        from curation.filtering import percentile_thresholds, verdicts

        recipe = self.recipe()
        path = self.ctx.run_dir / "ledger.parquet"
        signals = sorted({r.signal for r in recipe.rules})
        missing = [s for s in signals if s not in pq.read_schema(path).names]
        if missing:
            where = {r.signal: src for r, src in zip(recipe.rules, recipe.sources)}
            raise ConfigError([f"{where[s]}: signal {s!r} was not computed in this run (is the score stage in "
                               f"`stages:`, with it in score.scorers?)" for s in missing])  # fmt: skip
        ledger = pq.read_table(path, columns=["uid", "modality", *signals])
        rows = ledger.take(pc.index_in(uids, value_set=ledger.column("uid")))
        if rows.column("uid").null_count:  # the ledger holds every input record
            raise LedgerError(f"{path}: {rows.column('uid').null_count} records the filter was given are not in it")
        cuts = percentile_thresholds(recipe.rules, rows)
        return (recipe, rows, cuts, *verdicts(rows, recipe.rules, cuts))

    def preview(self) -> dict[str, Any]:
        """What the recipe would decide for the records this run's filter is given (those no stage before it
        rejected), as :meth:`run` decides, without writing anything: the summary :meth:`run` returns, with the
        percentile cuts. For trying thresholds on a finished run (``curation filter RUN_DIR --dry-run``)."""
        import pyarrow.compute as pc

        ledger = pq.read_table(self.ctx.run_dir / "ledger.parquet", columns=["uid", "status", "stage"])
        stages = self.config.stages
        after = stages[stages.index(self.name) :] if self.name in stages else []  # the filter and later stages
        rejected_after = pc.fill_null(pc.is_in(ledger.column("stage"), value_set=pa.array(after, pa.string())), False)
        given = ledger.filter(pc.or_(pc.equal(ledger.column("status"), "kept"), rejected_after))
        recipe, rows, cuts, reason, _ = self._judge(given.column("uid"))
        summary = self._summary(recipe, rows.select(["modality"]).append_column("reason", reason))
        return {**summary, "cuts": self._cuts(recipe, cuts)}

    def run(self, input_stage: str = "score") -> dict[str, Any]:
        """Judge every record the filter is given (:meth:`_judge`) and write a ledger part per crawl shard not
        yet done."""
        import pyarrow.compute as pc

        records = self.kept_records(columns=["uid"])
        shards = list(records)
        uids = pa.chunked_array([c for s in shards for c in records[s].column("uid").chunks], pa.string())
        recipe, rows, cuts, reason, detail = self._judge(uids)  # in shard order
        write_json(self.dir / "recipe.json", {**recipe.to_dict(), "cuts": self._cuts(recipe, cuts)})
        status = pc.if_else(pc.is_null(reason), "kept", "rejected")
        start = 0
        for shard in shards:
            n = records[shard].num_rows
            if not self.is_shard_done(shard):
                part = pa.table({"uid": rows.column("uid").slice(start, n), "status": status.slice(start, n),
                                 "stage": pa.array([self.name] * n, pa.string()), "reason": reason.slice(start, n),
                                 "detail": detail.slice(start, n), "dup_of": pa.nulls(n, pa.string())})  # fmt: skip
                write_part(self.ledger_path(shard), part)
                reasons = _counts(reason.slice(start, n))
                rejected = sum(reasons.values())
                self.mark_shard_done(shard, {"input": n, "kept": n - rejected, "rejected": rejected,
                                             "reasons": reasons})  # fmt: skip
            start += n
        # from the parts on disk, a resumed run's earlier shards included
        files = sorted((self.dir / "ledger").glob("*.parquet"))
        empty = pa.table({"uid": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        parts = pa.concat_tables([empty, *(pq.read_table(f, columns=["uid", "reason"]) for f in files)])
        at = pc.index_in(parts.column("uid"), value_set=rows.column("uid"))
        summary = self._summary(recipe, pa.table({"modality": rows.column("modality").take(at),
                                                  "reason": parts.column("reason")}))  # fmt: skip
        log.info("filter: recipe %s v%d: %d kept, %d rejected %s", recipe.name, recipe.version, summary["kept"],
                 summary["rejected"], summary["reasons"])  # fmt: skip
        return summary

    @staticmethod
    def _summary(recipe, decided: pa.Table) -> dict[str, Any]:
        """The stage's summary from the records' ``modality`` and ``reason`` (null: kept)."""
        import pyarrow.compute as pc

        reason = decided.column("reason")
        status = pc.if_else(pc.is_null(reason), "kept", "rejected")
        by_modality: dict[str, dict[str, int]] = {}
        grouped = decided.select(["modality"]).append_column("status", status).group_by(["modality", "status"])
        for c in grouped.aggregate([([], "count_all")]).to_pylist():
            by_modality.setdefault(c["modality"], {})[c["status"]] = c["count_all"]
        rejected = len(reason) - reason.null_count
        return {"input": len(reason), "kept": len(reason) - rejected, "rejected": rejected,
                "reasons": _counts(reason),
                "recipe": {"name": recipe.name, "version": recipe.version, "path": recipe.path,
                           "fingerprint": recipe.fingerprint()},
                "by_modality": {m: dict(sorted(c.items())) for m, c in sorted(by_modality.items())}}  # fmt: skip

    @staticmethod
    def _cuts(recipe, cuts: dict) -> list[dict[str, Any]]:
        """The percentile cuts as ``recipe.json`` lists them: the rule (its file and index), modality and value."""
        return [{"rule": recipe.sources[i], "modality": m, "signal": recipe.rules[i].signal, "value": v}
                for (i, m), v in sorted(cuts.items())]  # fmt: skip

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


def _counts(reason: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Rejects a reason, sorted by reason."""
    import pyarrow.compute as pc

    return dict(sorted((c["values"], c["counts"]) for c in pc.value_counts(reason.drop_null()).to_pylist()))
