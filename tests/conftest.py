"""Shared fixtures: the embedded sample (generated once per session), its loopback server, and one local Ray
instance sized like the 2-core machines this project is tested on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    if not gpu_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory) -> Path:
    from curation.sample import generate_sample

    out = tmp_path_factory.mktemp("sample")
    generate_sample(out, seed=0)
    return out


@pytest.fixture(scope="session")
def sample_server(sample_dir):
    from curation.sample import SampleServer, write_url_lists

    # slow URLs must outlast the crawler's read timeout (tests use the demo recipe's 2 s)
    with SampleServer(sample_dir, slow_seconds=8.0) as server:
        server.url_lists = write_url_lists(sample_dir, server.base_url)
        yield server


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def labels(sample_dir):
    import pyarrow.parquet as pq

    return pq.read_table(sample_dir / "labels.parquet").to_pylist()
