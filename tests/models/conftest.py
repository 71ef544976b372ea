"""Fixtures for the model tests: the embedded models, trained once and cached (see tests/stages/conftest.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a model hub, in any process


@pytest.fixture(scope="session")
def bootstrap_models():
    from curation.models.bootstrap import bootstrap

    return bootstrap()
