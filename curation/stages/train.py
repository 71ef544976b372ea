"""Train: stage 1 (projector pre-training) then stage 2 (instruction tuning) on the run's release, on Ray Train.

    train/pretrain/   metrics.jsonl, checkpoints/, train_config.json
    train/instruct/   the same; starts from stage 1's projectors

The trainer rejects nothing: its ledger part keeps every record it was given. A killed run, re-run, resumes each
stage from its last checkpoint; a finished stage (``_DONE.json``) is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curation.config import ConfigError
from curation.fsutil import read_json, write_json
from curation.ledger import kept_row, write_part
from curation.stages.base import Stage, log
from curation.train.args import TRAIN_STAGES


class TrainStage(Stage):
    """Pre-train the projectors, then instruction-tune, on the released shards."""

    name = "train"
    order = 70
    config_sections = ("train",)
    help = "train the projector (stage 1) and instruction-tune (stage 2) on the release with Ray Train"

    def release_dir(self) -> Path:
        cfg = self.config.train
        if cfg.release:
            return Path(cfg.release).expanduser()
        stages = self.config.stages
        if "release" not in stages or stages.index("release") > stages.index(self.name):
            raise ConfigError(["stages: train needs the release stage before it (it trains on RUN_DIR/release), "
                               "or set train.release to a release folder"])  # fmt: skip
        return self.ctx.run_dir / "release"

    def run(self, input_stage: str) -> dict[str, Any]:
        from curation.train.data import index_shards
        from curation.train.loop import latest_checkpoint, train_stage

        cfg = self.config.train
        release = self.release_dir()
        tars = sorted(release.glob("*.tar"))
        if not tars:
            raise ConfigError([f"train.release: {release} has no *.tar shards"])
        refs = index_shards(tars)
        log.info("train: %d samples in %d shards from %s", len(refs), len(tars), release)
        summary: dict[str, Any] = {}
        previous = None
        for name in TRAIN_STAGES:
            out = self.dir / name
            if not getattr(cfg, name).enabled:
                continue
            done = out / "_DONE.json"
            if done.is_file():
                summary[name] = read_json(done)
            else:
                summary[name] = train_stage(cfg, name, refs, out, init_from=previous)
                write_json(done, summary[name])
            log.info("train: %s: %s", name, summary[name])
            previous = latest_checkpoint(out)

        records = self.kept_records(columns=["uid"])
        given = [uid for table in records.values() for uid in table.column("uid").to_pylist()]
        write_part(self.ledger_path("train"), [kept_row(uid, self.name) for uid in given])
        return {"input": len(given), "kept": len(given), "rejected": 0, "samples": len(refs), **summary}
