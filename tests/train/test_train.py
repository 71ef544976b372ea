"""The trainer: both stages on 2 Ray Train workers (CPU, gloo), the loss falls, checkpoints resume a killed run
with the same data order, and the train stage keeps every record in the ledger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ray.train import TrainingFailedError
from train_factories import train_settings

from curation.config import ConfigError, load_config
from curation.runner import Run
from curation.train.loop import FAIL_ENV, latest_checkpoint

pytestmark = pytest.mark.slow


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def train_config(run_dir: Path, **train) -> object:
    return load_config(data={"name": "train-test", "stages": ["crawl", "format", "release", "train"],
                             "input": {"path": json.loads((run_dir / "run.json").read_text())["config"]["input"]["path"]},
                             "crawl": {"shard_size": 16}, "train": train_settings(**train)})  # fmt: skip


def fresh_copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("train"))
    return dest


def test_train_stage_both_stages_loss_falls(small_release, tmp_path):
    run_dir = fresh_copy(small_release, tmp_path / "run")
    state = Run(train_config(run_dir, steps=6), run_dir).run()
    assert state["status"] == "complete"
    for stage in ("pretrain", "instruct"):
        rows = metrics(run_dir / "train" / stage)
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert all({"step", "loss", "lr", "samples_per_s"} <= set(r) for r in rows)
        assert all(0 <= r["data_wait_seconds"] <= r["seconds"] for r in rows)
        assert rows[-1]["loss"] < rows[0]["loss"], (stage, [r["loss"] for r in rows])
        assert (latest_checkpoint(run_dir / "train" / stage) / "trainable.safetensors").is_file()
        assert json.loads((run_dir / "train" / stage / "train_config.json").read_text())["stage"] == stage
    counts = state["counts"]
    summary = state["stages"]["train"]["summary"]
    assert summary["rejected"] == 0 and summary["kept"] == counts["kept"] == summary["input"]


def test_killed_run_resumes_with_the_same_data_order(small_release, tmp_path, monkeypatch):
    full = fresh_copy(small_release, tmp_path / "full")
    settings = {"steps": 4, "instruct": {"enabled": False}}
    Run(train_config(full, **settings), full).run()
    reference = metrics(full / "train" / "pretrain")

    killed = fresh_copy(small_release, tmp_path / "killed")
    monkeypatch.setenv(FAIL_ENV, "3")  # a worker dies after step 3; the checkpoint is at step 2
    with pytest.raises(TrainingFailedError):
        Run(train_config(killed, **settings), killed).run()
    out = killed / "train" / "pretrain"
    assert latest_checkpoint(out).name == "step-0000002"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    monkeypatch.delenv(FAIL_ENV)
    state = Run(train_config(killed, **settings), killed).run()
    assert state["status"] == "complete"
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # step 3 was redone, not logged twice
    for a, b in zip(reference, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (reference, resumed)


def test_train_needs_the_release_stage(small_release, tmp_path):
    config = load_config(data={"name": "t", "stages": ["crawl", "train"], "input": {"path": "x"}})
    from curation.stages.base import StageContext
    from curation.stages.train import TrainStage

    with pytest.raises(ConfigError, match="needs the release stage"):
        TrainStage(StageContext(tmp_path, config)).run("crawl")


@pytest.mark.quick
def test_gpu_workers_never_outnumber_the_gpus():
    """Each worker takes a whole GPU: asking for more than the cluster has would leave Ray Train waiting forever
    (seen on a one-GPU machine with the default two workers). The global batch stays whole."""
    from curation.train.args import StageArgs, TrainConfig
    from curation.train.loop import worker_count

    cfg = TrainConfig(num_workers=4)
    stage = StageArgs(global_batch_size=96, micro_batch_size=8)  # divisible by 8 x {1, 2, 3, 4}
    assert worker_count(cfg, stage, None) == 4  # CPU workers: as asked
    assert [worker_count(cfg, stage, g) for g in (1, 2, 3, 4, 8)] == [1, 2, 3, 4, 4]
    odd = StageArgs(global_batch_size=64, micro_batch_size=8)  # 64 = 8 x 8: three workers would not divide it
    assert worker_count(cfg, odd, 3) == 2
    with pytest.raises(ConfigError, match="no GPU"):
        worker_count(cfg, stage, 0)


class _AllocatorState:
    """A dataset whose items report whether the process serving them set the decode allocator."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> object:
        from curation.scoring import decode

        return decode._MALLOC_SET


@pytest.mark.quick
def test_trainer_data_workers_keep_the_memory_decoding_frees():
    """The trainer's DataLoader workers decode media as the score stage's tasks do, and set the allocator as they
    do (an audio sample for the default CLAP extractor: 19 ms with glibc's defaults, 10 ms with the setting),
    while a worker started without the trainer's set-up does not."""
    import torch

    from curation.train.loop import _decode_worker

    def states(**kwargs) -> list:  # fresh worker interpreters: a forked one would inherit this process's setting
        loader = torch.utils.data.DataLoader(_AllocatorState(), batch_size=None, num_workers=1,
                                             multiprocessing_context="spawn", **kwargs)  # fmt: skip
        return list(loader)

    assert states(worker_init_fn=_decode_worker) == [True, True]
    assert states() == [None, None]
