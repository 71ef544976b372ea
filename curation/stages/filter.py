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
from curation.ledger import kept_row, rejected_row, write_part
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
        from curation.filtering import judge, percentile_thresholds

        recipe = self.recipe()
        records = self.kept_records()
        uids = {u for t in records.values() for u in t.column("uid").to_pylist()}
        ledger = pq.read_table(self.ctx.run_dir / "ledger.parquet")
        signals = sorted({r.signal for r in recipe.rules})
        missing = [s for s in signals if s not in ledger.column_names]
        if missing:
            where = {r.signal: src for r, src in zip(recipe.rules, recipe.sources)}
            raise ConfigError([f"{where[s]}: signal {s!r} was not computed in this run (is the score stage in "
                               f"`stages:`, with it in score.scorers?)" for s in missing])  # fmt: skip
        rows = [r for r in ledger.select(["uid", "modality", *signals]).to_pylist() if r["uid"] in uids]
        by_uid = {r["uid"]: r for r in rows}
        cuts = percentile_thresholds(recipe.rules, rows)
        write_json(self.dir / "recipe.json", {**recipe.to_dict(), "cuts": [
            {"rule": recipe.sources[i], "modality": m, "signal": recipe.rules[i].signal, "value": v}
            for (i, m), v in sorted(cuts.items())]})  # fmt: skip
        totals: Counter = Counter()
        reasons: Counter = Counter()
        by_modality: dict[str, Counter] = {}
        for shard, table in records.items():
            if not self.is_shard_done(shard):
                out, shard_reasons = [], Counter()
                for uid in table.column("uid").to_pylist():
                    verdict = judge(by_uid[uid], recipe.rules, cuts)
                    if verdict is None:
                        out.append(kept_row(uid, self.name))
                    else:
                        shard_reasons[verdict.reason] += 1
                        out.append(rejected_row(uid, self.name, verdict.reason, verdict.detail))
                write_part(self.ledger_path(shard), out)
                rejected = sum(shard_reasons.values())
                self.mark_shard_done(shard, {"input": len(out), "kept": len(out) - rejected, "rejected": rejected,
                                             "reasons": dict(shard_reasons)})  # fmt: skip
            s = read_json(self.done_path(shard))
            totals.update({k: s[k] for k in ("input", "kept", "rejected")})
            reasons.update(s["reasons"])
        for part in sorted((self.dir / "ledger").glob("*.parquet")):
            for r in pq.read_table(part, columns=["uid", "status"]).to_pylist():
                by_modality.setdefault(by_uid[r["uid"]]["modality"], Counter())[r["status"]] += 1
        log.info("filter: recipe %s v%d: %d kept, %d rejected %s", recipe.name, recipe.version, totals["kept"],
                 totals["rejected"], dict(reasons))  # fmt: skip
        return {**{k: totals[k] for k in ("input", "kept", "rejected")}, "reasons": dict(sorted(reasons.items())),
                "recipe": {"name": recipe.name, "version": recipe.version, "path": recipe.path,
                           "fingerprint": recipe.fingerprint()},
                "by_modality": {m: dict(c) for m, c in sorted(by_modality.items())}}  # fmt: skip

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
