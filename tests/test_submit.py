"""`curation submit` against a real Ray head (job server and token authentication on, bound to loopback)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A head of its own, stopped by killing its process group: `ray stop` would stop every Ray instance on
    the machine, including the test session's."""
    # a short temp dir: Ray's unix socket paths must stay under 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    # every port of its own: the test session's Ray instance already holds the default agent ports, and a head
    # whose job agent cannot bind answers every submission with "No available agent"
    ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
        )
    ]
    # the job's entrypoint runs `python` from the head's PATH: this venv's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port=0",
         "--node-ip-address=127.0.0.1", "--num-cpus=1", "--dashboard-host=127.0.0.1", f"--dashboard-port={port}",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp}", *ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, "ray start exited"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.time() < deadline, "the Ray head's job server did not come up"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, sample_dir, tmp_path):
    address, env = ray_head
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", "submit", str(ROOT / "pipelines" / "demo.yaml"), "--address", address,
         "--out", str(out), "--set", f"input.path={sample_dir / 'media'}", "--set", "input.limit=12",
         "--set", "stages=[crawl]"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    ledger = pq.read_table(out / "ledger.parquet")
    assert ledger.num_rows == 12


def test_a_local_run_serves_the_dashboard_whose_state_api_ray_train_watches(tmp_path):
    """Ray Train's placement-group clean-up asks the dashboard's state API whether its controller lives; a local
    instance started without the dashboard makes it log a warning every few seconds of every training run."""
    script = """
import logging, sys
from curation.config import load_config
from curation.runner import init_ray, setup_logging
setup_logging()
config = load_config(data={"name": "t", "ray": {"num_cpus": 1, "dashboard": sys.argv[1] == "on"}})
init_ray(config)
import ray
from ray.util.state import list_actors
try:  # this instance's address: the test session's own instance may run beside it
    list_actors(address=ray.get_runtime_context().gcs_address)
    print("STATE API ANSWERS")
except Exception as e:
    print("STATE API FAILS", type(e).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for mode, expected in (("on", "STATE API ANSWERS"), ("off", "STATE API FAILS")):
        out = subprocess.run([sys.executable, "-c", script, mode], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert expected in out.stdout, (mode, out.stdout, out.stderr[-2000:])
        assert ("dashboard at http://127.0.0.1:" in out.stderr) == (mode == "on"), out.stderr[-2000:]
