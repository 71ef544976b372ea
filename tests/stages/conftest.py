"""Shared by the score and filter tests: the embedded models (trained once, cached) and one run of the real
pipeline, crawl -> score -> filter, on the embedded sample served from loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub, in any process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bootstrap_models():
    """The tiny CLIP, CLAP and LM, trained on first use (a few minutes on 2 cores) into the user's model cache
    (``$CURATION_CACHE`` or ``~/.cache/curation/models``): deterministic and versioned, so one copy serves every
    session. Trained before Ray starts work, with the machine's cores to itself."""
    from curation.models.bootstrap import bootstrap

    return bootstrap()


@pytest.fixture(scope="session")
def scored_run(tmp_path_factory, sample_server, bootstrap_models, ray_session):
    """(run_dir, state) of ``pipelines/demo.yaml`` restricted to crawl -> score -> filter (default recipe)."""
    from curation.config import load_config
    from curation.runner import Run

    out = tmp_path_factory.mktemp("scored") / "run"
    overrides = [f"input.path={sample_server.url_lists['parquet']}", "stages=[crawl, score, filter]",
                 "filter.recipe=default"]  # fmt: skip
    config = load_config(ROOT / "pipelines" / "demo.yaml", overrides)
    state = Run(config, out).run()
    return out, state
