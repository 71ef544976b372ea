"""Run a pipeline on a run directory, resuming whatever a previous attempt left unfinished.

Order of work: the input is read once into record shards (``RUN_DIR/input/``), then each stage of ``stages:``
runs on Ray over the records its predecessor kept. After every stage the ledger is re-assembled and
``run.json`` updated, so a user watching the run directory always sees where it stands.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.config import ConfigError, PipelineConfig
from curation.fsutil import atomic_path, read_json, write_json
from curation.inputs import read_input
from curation.ledger import assemble_ledger, rejected_row, write_part
from curation.stages import get_stage
from curation.stages.base import StageContext

log = logging.getLogger("curation")
VERSIONED_PACKAGES = (
    "curation", "ray", "pyarrow", "webdataset", "img2dataset", "datatrove", "open_clip_torch", "torch",
    "transformers", "faiss-cpu", "fasttext-numpy2-wheel", "av", "pillow", "numpy",
)  # fmt: skip


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # faiss reports at INFO each CPU-specific build it could not import before the one it loads
    logging.getLogger("faiss.loader").setLevel(logging.DEBUG if verbose else logging.WARNING)


def init_ray(config: PipelineConfig, address: str | None = None) -> bool:
    """Connect to ``address`` (or ``ray.address``, or ``RAY_ADDRESS``), else start a local instance.
    Returns True when this call started Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # "local" and not None: a bare ray.init() attaches to whatever cluster another process left running
    address = address or config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        info = ray.init(
            address="local",
            num_cpus=config.ray.num_cpus,
            object_store_memory=(config.ray.object_store_memory_mb or 0) * 2**20 or None,
            include_dashboard=config.ray.dashboard,
            **kwargs,
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    dashboard = "" if address else info.dashboard_url
    log.info("ray: %s with %s CPUs%s", address or "local instance", ray.cluster_resources().get("CPU"),
             f", dashboard at http://{dashboard}" if dashboard else "")  # fmt: skip
    return True


class Run:
    """A run directory and the pipeline that fills it."""

    def __init__(self, config: PipelineConfig, run_dir: str | Path):
        self.config = config
        self.run_dir = Path(run_dir).resolve()
        self.ctx = StageContext(self.run_dir, config)
        self.state_path = self.run_dir / "run.json"

    # -- run.json ----------------------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            return read_json(self.state_path)
        return {"created": time.time(), "stages": {}}

    def save_state(self, state: dict[str, Any]) -> None:
        state.update(
            name=self.config.name,
            run_dir=str(self.run_dir),
            config=self.config.to_dict(),
            versions=package_versions(),
            updated=time.time(),
        )
        write_json(self.state_path, state)

    # -- input ------------------------------------------------------------------------------------------
    def input_fingerprint(self) -> str:
        return self.config.section_fingerprint("input") + f"-{self.config.crawl.shard_size}"

    def ingest(self, state: dict[str, Any]) -> dict[str, Any]:
        """Read ``input.path`` into record shards of ``crawl.shard_size``; reject unusable rows at once."""
        done = self.run_dir / "input" / "_SUCCESS.json"
        if done.is_file():
            record = read_json(done)
            if record["fingerprint"] != self.input_fingerprint():
                raise ConfigError(
                    [
                        f"{self.run_dir}: this run directory was started on other input settings ({record['path']}); "
                        "use a new --out for a new input"
                    ]
                )
            return record
        started = time.time()
        table = read_input(self.config.input)
        if table.num_rows == 0:
            raise ConfigError([f"input.path {self.config.input.path}: no records found"])
        records_dir = self.run_dir / "input" / "records"
        if records_dir.exists():  # a half-written ingest from a killed run
            shutil.rmtree(records_dir)
        size = self.config.crawl.shard_size
        for i, start in enumerate(range(0, table.num_rows, size)):
            with atomic_path(records_dir / f"{i:05d}.parquet") as tmp:
                pq.write_table(table.slice(start, size), tmp)
        errors = table.filter(pc.is_valid(table.column("input_error"))).to_pylist()
        write_part(
            self.run_dir / "input" / "ledger" / "input.parquet",
            [rejected_row(r["uid"], "input", r["input_error"], r["input_detail"]) for r in errors],
        )
        record = {
            "fingerprint": self.input_fingerprint(),
            "path": self.config.input.path,
            "records": table.num_rows,
            "rejected": len(errors),
            "shards": -(-table.num_rows // size),
            "seconds": round(time.time() - started, 3),
        }
        write_json(done, record)
        log.info(
            "input: %d records in %d shards (%d unusable rows rejected)", table.num_rows, record["shards"], len(errors)
        )
        return record

    # -- stages -----------------------------------------------------------------------------------------
    def run(self, address: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
        """Run (or resume) the pipeline; ``only`` restricts it to some stages (their predecessors must be done)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = self.load_state()
        state["status"] = "running"
        self.save_state(state)
        completed: list[str] = []
        assembled: list[str] | None = None  # the stages this process last assembled the ledger from
        started_ray = False
        try:
            state["input"] = self.ingest(state)
            for name in self.config.stages:
                stage = get_stage(name)(self.ctx)
                entry = state["stages"].setdefault(name, {"status": "pending"})
                if stage.success_path.is_file():
                    record = read_json(stage.success_path)
                    if record["fingerprint"] != stage.fingerprint():
                        raise ConfigError(
                            [
                                f"{self.run_dir}: stage {name} was completed with other settings; "
                                "use a new --out, or delete "
                                f"{stage.dir} to redo it"
                            ]
                        )
                    log.info("%s: complete, skipped", name)
                    completed.append(name)
                    continue
                if only and name not in only:
                    break
                if stage.needs_ray and not started_ray:
                    started_ray = init_ray(self.config, address)
                # the ledger must reflect exactly the completed stages: a stage folder deleted to redo it may
                # still have rejects in the last assembled ledger (assembled by this process after the previous
                # stage, it does)
                if assembled != completed:
                    assemble_ledger(self.run_dir, completed)
                log.info("%s: running", name)
                t0 = time.time()
                entry.update(status="running", started=t0)
                self.save_state(state)
                summary = stage.run(completed[-1] if completed else "input")
                entry.update(
                    status="complete", finished=time.time(), seconds=round(time.time() - t0, 3), summary=summary
                )
                write_json(stage.success_path, {"fingerprint": stage.fingerprint(), "summary": summary})
                completed.append(name)
                state["counts"] = assemble_ledger(self.run_dir, completed)
                assembled = list(completed)
                self.save_state(state)
                log.info("%s: done in %.1f s: %s", name, entry["seconds"], _short(summary))
        except BaseException:
            state["status"] = "failed"
            self.save_state(state)
            raise
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        if assembled != completed:
            state["counts"] = assemble_ledger(self.run_dir, completed)
        state["status"] = "complete" if completed == self.config.stages else "partial"
        self.save_state(state)
        return state


def _short(summary: dict[str, Any]) -> str:
    keys = ("input", "kept", "rejected")
    return ", ".join(f"{k} {summary[k]}" for k in keys if k in summary)
