"""Release: the formatted samples as checksummed webdataset shards a trainer or a user downloads and trusts.

    release/<modality>-<ext>-NNNNNN.tar   webdataset: <key>.<ext> (media), <key>.txt (caption), <key>.json (sample)
    release/index.parquet                 one row per sample: key, shard, byte ranges, metadata, scores
    release/README.md                     the dataset card: contents, filter funnel, score distributions, recipe
    release/schemas/*.schema.json         the JSON Schemas the files follow
    release/exports/                      optional LLaVA and LLaMA-Factory (sharegpt) forms with a media folder
    release/manifest.json                 every file above with size and sha256 (written last)

Run bookkeeping sits beside them and is not part of the release: ``ledger/``, ``done/``, ``_work/`` and
``_SUCCESS.json``. The same run gives byte-identical shards, index, card and manifest (fixed member mtime, fixed
order, no timestamps), also when a killed release is resumed. With ``release.out`` the finished release is also
published to a folder or fsspec URL.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import ConfigError
from curation.fsutil import atomic_path, read_json, write_json
from curation.ledger import BASE_COLUMNS, write_part
from curation.release import card, exports
from curation.release import manifest as manifests
from curation.release.shards import (
    INDEX_SCHEMA,
    ShardPlan,
    WebDatasetShardWriter,
    assign_shards,
    dumps,
    index_schema,
    plan_release,
    render_samples,
)
from curation.schemas import SCHEMA_DIR
from curation.stages.base import TASKS_FROM_RECORDS, Stage, ipc_bytes, log, map_shards, read_ipc, read_kept

# where a release is published and how many tasks write it do not change what the release is
EXECUTION_KEYS = ("out", "storage_options", "parallelism", "num_cpus")


def _write_task(shard: str, crawl_shards: str, run_dir: str, release_dir: str, export_media: bool, scores: list[str]):
    """One Ray task of :func:`map_shards`: write a release shard and its done marker."""
    writer = WebDatasetShardWriter(Path(run_dir), Path(release_dir), export_media)
    summary = {**writer.write(shard, json.loads(crawl_shards), scores), "shard": shard}
    write_json(Path(release_dir) / "done" / f"{shard}.json", summary)
    return summary


def _render_task(crawl_shard: str, uids: bytes, scores: bytes, run_dir: str, out_dir: str):
    """One Ray task of :func:`map_shards`: render the samples of a crawl shard's kept records (``uids`` and their
    ``scores`` as Arrow IPC streams; the task reads the records) into ``out_dir/<crawl_shard>.parquet``."""
    records = read_kept(run_dir, crawl_shard, read_ipc(uids).column("uid"))
    formatted = Path(run_dir) / "format" / "shards" / f"{crawl_shard}.parquet"
    table = render_samples(crawl_shard, records, formatted, read_ipc(scores))
    with atomic_path(Path(out_dir) / f"{crawl_shard}.parquet") as tmp:
        pq.write_table(table, tmp)
    return {"crawl_shard": crawl_shard, "samples": table.num_rows}


class ReleaseStage(Stage):
    """Write the formatted samples as a sharded, checksummed, documented release."""

    name = "release"
    order = 60
    config_sections = ("release",)
    help = "write webdataset shards, index.parquet, manifest.json, a dataset card and exports"

    def fingerprint(self) -> str:
        data = self.config.to_dict()
        release = {k: v for k, v in data["release"].items() if k not in EXECUTION_KEYS}
        return hashlib.sha256(dumps({"input": data["input"], "release": release})).hexdigest()[:16]

    @property
    def success_path(self) -> Path:
        # with release.out, "complete" means built *and* published there: publishing to a new destination reruns
        # the stage (which reuses the finished build) instead of being skipped as complete
        out = self.config.release.out
        if not out:
            return self.dir / "_SUCCESS.json"
        return self.dir / "published" / f"{hashlib.sha256(out.encode()).hexdigest()[:16]}.json"

    def run(self, input_stage: str) -> dict[str, Any]:
        cfg = self.config.release
        stages = self.config.stages
        if "format" not in stages or stages.index("format") > stages.index(self.name):
            raise ConfigError(["stages: release needs the format stage before it (it releases formatted samples)"])
        built = self.dir / "_SUCCESS.json"
        if cfg.out and built.is_file():
            record = read_json(built)
            if record["fingerprint"] != self.fingerprint():
                raise ConfigError([f"{self.dir}: the release was built with other settings; delete it to rebuild"])
            summary = record["summary"]
        else:
            summary = self.build()
            if cfg.out:
                write_json(built, {"fingerprint": self.fingerprint(), "summary": summary})
        if cfg.out:
            log.info("release: publishing to %s", cfg.out)
            summary = {**summary, "published": manifests.publish(self.dir, cfg.out, cfg.storage_options)}
        return summary

    # -- building ---------------------------------------------------------------------------------------------
    def build(self) -> dict[str, Any]:
        cfg = self.config.release
        run_dir = self.ctx.run_dir
        ledger = pq.read_table(run_dir / "ledger.parquet")
        score_columns = [
            f.name
            for f in ledger.schema
            if f.name not in BASE_COLUMNS
            and f.name not in INDEX_SCHEMA.names
            and (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        ]
        plans = self._plan(ledger, score_columns)
        self._remove_stale(plans)
        pending = [p for p in plans.values() if not self._is_current(p)]
        log.info("release: %d shards, %d already complete", len(plans), len(plans) - len(pending))
        self._write_shards(pending, score_columns)
        done = {name: read_json(self.done_path(name)) for name in plans}
        if not plans:  # nothing reached the release: its ledger part still says so
            write_part(self.dir / "ledger" / "none.parquet", [])

        index = pa.concat_tables(
            [pq.read_table(self.dir / "_work" / "index" / f"{name}.parquet") for name in plans]
            or [index_schema(score_columns).empty_table()]
        )
        with atomic_path(self.dir / "index.parquet") as tmp:
            pq.write_table(index, tmp)
        released = set(index.column("key").to_pylist())
        release_rejects: Counter = Counter()
        for s in done.values():
            release_rejects.update(s["reasons"])

        export_files = self._write_exports(plans, released)
        schema_files = self._copy_schemas()
        facts = self.card_facts(ledger, index, plans, score_columns, dict(release_rejects), export_files)
        card_path = self.dir / "README.md"
        with atomic_path(card_path) as tmp:
            tmp.write_text(card.render_card(facts), encoding="utf-8")

        modalities = Counter(index.column("modality").to_pylist())
        # the shard writers hashed the tars as they wrote them: no second pass over the largest files
        files = [
            {"path": f"{name}.tar", "size": done[name]["size"], "sha256": done[name]["sha256"], "samples": s["samples"]}
            for name, s in done.items()
        ]
        files += [manifests.file_entry(self.dir, p) for p in (self.dir / "index.parquet", card_path, *schema_files)]
        files += [manifests.file_entry(self.dir, p) for p in export_files]
        if cfg.exports:
            files += [
                {"path": f"exports/media/{k}.{e}", "size": n, "sha256": h}
                for k, e, n, h in zip(*(index.column(c).to_pylist() for c in ("key", "ext", "media_size", "sha256")))
            ]
        counts = {"samples": index.num_rows, "shards": len(plans), "rejected": sum(release_rejects.values())}
        counts.update({m: modalities.get(m, 0) for m in ("image", "video", "audio")})
        manifest = {
            "name": facts["name"],
            "version": cfg.version,
            "license": cfg.license,
            "created_from": hashlib.sha256(dumps(facts["recipe"])).hexdigest()[:16],
            "counts": counts,
            "tokenizer": facts["tokenizer"],
            "files": files,
        }
        manifests.write_manifest(self.dir, manifest)
        return {
            "input": sum(s["samples"] + s["rejected"] for s in done.values()),
            "kept": index.num_rows,
            "rejected": counts["rejected"],
            "reasons": dict(sorted(release_rejects.items())),
            "shards": len(plans),
            "bytes": sum(s["size"] for s in done.values()),
            "modalities": dict(sorted(modalities.items())),
        }

    def _plan(self, ledger: pa.Table, score_columns: list[str]) -> dict[str, ShardPlan]:
        """Render every kept record's sample and assign it a shard (:mod:`curation.release.shards`). Rendering
        (a JSON member a record) runs as a Ray task a crawl shard when there are many records; assigning, which
        goes through the records in order, runs here."""
        import ray

        cfg = self.config.release
        records = self.kept_records(columns=["uid"])  # the rest is read a crawl shard at a time
        scores = {}
        if score_columns:
            kept = ledger.filter(pc.equal(ledger.column("status"), "kept")).select(["uid", *score_columns])
            for shard, table in records.items():
                at = pc.index_in(table.column("uid"), value_set=kept.column("uid")).drop_null()
                scores[shard] = kept.take(at)
        formatted, plan_dir = self.ctx.run_dir / "format" / "shards", self.dir / "_work" / "plan"
        todo = sum(t.num_rows for t in records.values())
        if len(records) < 2 or cfg.parallelism == 1 or todo < TASKS_FROM_RECORDS or not ray.is_initialized():
            records = {s: read_kept(self.ctx.run_dir, s, t.column("uid")) for s, t in records.items()}
            return plan_release(records, formatted, scores, plan_dir, cfg.max_shard_samples, cfg.max_shard_bytes)
        rendered_dir = self.dir / "_work" / "rendered"
        items = [
            {"crawl_shard": s, "uids": ipc_bytes(t), "scores": ipc_bytes(scores.get(s))} for s, t in records.items()
        ]
        kwargs = {"run_dir": str(self.ctx.run_dir), "out_dir": str(rendered_dir)}
        # a core a task: rendering is Python throughout (the shard writers, mostly reading and writing, take less)
        for n, s in enumerate(map_shards(_render_task, items, 1.0, cfg.parallelism, **kwargs), 1):
            log.info("release: rendered crawl shard %s (%d/%d): %d samples", s["crawl_shard"], n, len(items),
                     s["samples"])  # fmt: skip
        rendered = ((s, pq.read_table(rendered_dir / f"{s}.parquet")) for s in sorted(records))
        plans = assign_shards(rendered, plan_dir, cfg.max_shard_samples, cfg.max_shard_bytes)
        shutil.rmtree(rendered_dir)  # the plan holds the same rows now
        return plans

    def _is_current(self, plan: ShardPlan) -> bool:
        """A shard finished by an earlier attempt counts only if it was written from the same plan."""
        if not self.is_shard_done(plan.name) or not (self.dir / f"{plan.name}.tar").is_file():
            return False
        return read_json(self.done_path(plan.name)).get("plan_hash") == plan.plan_hash

    def _remove_stale(self, plans: dict[str, ShardPlan]) -> None:
        """Drop what an earlier attempt wrote for shards the plan no longer has (a ledger part of one would
        account for records twice)."""
        for folder, suffix in (("", ".tar"), ("ledger", ".parquet"), ("done", ".json"), ("_work/index", ".parquet")):
            for path in (self.dir / folder).glob(f"*{suffix}"):
                if path.name[: -len(suffix)] not in plans:
                    path.unlink()
        for folder in ("", "exports", "exports/media"):  # half-written files of a killed attempt
            for path in (self.dir / folder).glob(".*.tmp-*"):
                path.unlink()
        if not self.config.release.exports and (self.dir / "exports").exists():
            shutil.rmtree(self.dir / "exports")

    def _write_shards(self, pending: list[ShardPlan], score_columns: list[str]) -> None:
        cfg = self.config.release
        export_media = bool(cfg.exports)
        if not pending:
            return
        if len(pending) == 1 or cfg.parallelism == 1:
            writer = WebDatasetShardWriter(self.ctx.run_dir, self.dir, export_media)
            for plan in pending:
                summary = writer.write(plan.name, plan.crawl_shards, score_columns)
                write_json(self.done_path(plan.name), {**summary, "shard": plan.name})
                log.info("release: shard %s: %d samples, %d bytes", plan.name, summary["samples"], summary["size"])
            return
        items = [{"shard": p.name, "crawl_shards": json.dumps(p.crawl_shards)} for p in pending]
        summaries = map_shards(_write_task, items, cfg.num_cpus, cfg.parallelism, run_dir=str(self.ctx.run_dir),
                               release_dir=str(self.dir), export_media=export_media, scores=score_columns)  # fmt: skip
        for n, s in enumerate(summaries, 1):
            log.info("release: shard %s (%d/%d): %d samples, %d bytes", s["shard"], n, len(pending), s["samples"],
                     s["size"])  # fmt: skip

    def _released_samples(self, plans: dict[str, ShardPlan], released: set[str]):
        for path in sorted((self.dir / "_work" / "plan").glob("*.parquet")):
            for row in pq.read_table(path, columns=["key", "sample_json"]).to_pylist():
                if row["key"] in released:
                    yield json.loads(row["sample_json"])

    def _write_exports(self, plans: dict[str, ShardPlan], released: set[str]) -> list[Path]:
        kinds = self.config.release.exports
        if not kinds:
            return []
        media = self.dir / "exports" / "media"
        for path in media.glob("*") if media.is_dir() else ():
            if path.name.partition(".")[0] not in released:  # from an attempt that rejected differently
                path.unlink()
        return exports.write_exports(
            self.dir / "exports", lambda: self._released_samples(plans, released), kinds, self.dataset_id
        )

    def _copy_schemas(self) -> list[Path]:
        out = []
        for src in sorted(SCHEMA_DIR.glob("*.schema.json")):
            dst = self.dir / "schemas" / src.name
            with atomic_path(dst) as tmp:
                tmp.write_bytes(src.read_bytes())
            out.append(dst)
        return out

    # -- the dataset card ---------------------------------------------------------------------------------------
    @property
    def dataset_name(self) -> str:
        return self.config.release.name or self.config.name

    @property
    def dataset_id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "_", self.dataset_name.lower()).strip("_") or "dataset"

    def recipe(self) -> dict[str, Any]:
        """The resolved config, less where and how the run executed and where the release is published."""
        data = self.config.to_dict()
        data.pop("ray", None)
        for key in EXECUTION_KEYS:
            data["release"].pop(key, None)
        return data

    def card_facts(
        self,
        ledger: pa.Table,
        index: pa.Table,
        plans: dict[str, ShardPlan],
        score_columns: list[str],
        release_rejects: dict[str, int],
        export_files: list[Path],
    ) -> dict[str, Any]:
        cfg = self.config.release
        rows = index.select(["modality", "shard", "media_size"]).to_pylist()
        modalities: dict[str, dict[str, Any]] = {}
        for r in rows:
            m = modalities.setdefault(r["modality"], {"samples": 0, "shards": set(), "media_bytes": 0})
            m["samples"] += 1
            m["shards"].add(r["shard"])
            m["media_bytes"] += r["media_size"]
        for m in modalities.values():
            m["shards"] = len(m["shards"])
        released = set(index.column("key").to_pylist())
        stages = self.config.stages[: self.config.stages.index(self.name) + 1]
        run_state = read_json(self.ctx.run_dir / "run.json") if (self.ctx.run_dir / "run.json").is_file() else {}
        fmt = self.config.format
        tokenizer = None
        fmt_done = self.ctx.run_dir / "format" / "_SUCCESS.json"
        fmt_summary = read_json(fmt_done)["summary"] if fmt_done.is_file() else {}
        if fmt_summary.get("tokenizer"):
            from curation.instruct import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, MEDIA_TOKEN_INDEX

            tokenizer = {
                "name": Path(fmt_summary["tokenizer"]["path"]).name,
                "sha256": fmt_summary["tokenizer"]["sha256"],
                "media_token_index": MEDIA_TOKEN_INDEX,
                "ignore_index": IGNORE_INDEX,
                "templates": {"conversations": "vicuna_v1", "pretrain_conversations": "plain"},
                "system_prompt": fmt.system_prompt if fmt.system_prompt is not None else DEFAULT_SYSTEM_PROMPT,
            }
        series = Counter(name.rsplit("-", 1)[0] for name in plans)
        return {
            "name": self.dataset_name,
            "dataset_id": self.dataset_id,
            "version": cfg.version,
            "license": cfg.license,
            "description": self.config.description,
            "modalities": modalities,
            "generators": dict(Counter(index.column("generator").to_pylist())),
            "funnel": card.funnel(ledger, stages, release_rejects),
            "scores": {
                c: {
                    "all": card.numeric_stats(ledger.column(c)),
                    "released": card.numeric_stats(index.column(c)) if index.num_rows else None,
                }
                for c in score_columns
            },
            "sources": card.sources(ledger, released),
            "series": dict(series),
            "exports": [p.relative_to(self.dir).as_posix() for p in export_files],
            "export_kinds": list(cfg.exports),
            "tokenizer": tokenizer,
            "recipe": self.recipe(),
            "versions": run_state.get("versions", {}),
        }
