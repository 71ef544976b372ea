"""A run directory released from a small generated sample (crawl -> format -> release, the real stages, no
network), shared by the trainer's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def small_release(tmp_path_factory, ray_session):
    """A run directory with a finished release of 16 images, 4 videos and 4 audio clips (clean sample, seed 3)."""
    from curation.config import load_config
    from curation.runner import Run
    from curation.sample import generate_sample, media_folder

    tmp = tmp_path_factory.mktemp("train-release")
    generate_sample(tmp / "sample", seed=3, n_image=16, n_video=4, n_audio=4, defect_rate=0.0)
    media = media_folder(tmp / "sample", tmp / "media")
    config = load_config(data={"name": "train-test", "stages": ["crawl", "format", "release"],
                               "input": {"path": str(media)}, "crawl": {"shard_size": 16}})  # fmt: skip
    Run(config, tmp / "run").run()
    return tmp / "run"
