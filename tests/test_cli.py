"""The command line: every subcommand explains itself, bad configs fail fast with exit code 2."""

import subprocess
import sys

import pytest

from curation.cli import build_parser, main
from curation.stages import STAGES

pytestmark = pytest.mark.quick


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"run", "sample", "demo", "submit", *STAGES} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: curation " + name) and len(out) > 200


def test_bad_config_exits_2_with_every_problem(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [crawl]\ninput: {path: x.csv}\ncrawl: {threads: 0, max_bytes: -1}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "crawl.threads: must be >= 1" in err and "crawl.max_bytes: must be >= 1" in err
    assert not (tmp_path / "run").exists()


def test_stage_subcommand_needs_a_run_dir(tmp_path, capsys):
    assert main(["crawl", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "curation.cli", "--help"], capture_output=True, text=True, check=True)
    assert "crawl" in out.stdout and "submit" in out.stdout


def test_demo_serves_on_its_fixed_port_and_falls_back_when_taken(tmp_path):
    """The demo's URLs hold the sample server's port, and record uids hash the URLs: a fixed port makes every
    default demo produce the same uids, shards and training batches. A taken port must not stop the demo."""
    import socket

    from curation.cli import SAMPLE_PORT, _demo_server

    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", SAMPLE_PORT))  # whether we or something else holds it, it is taken now
        blocker.listen()
    except OSError:
        pass
    with _demo_server(tmp_path, None) as server:
        assert server.port not in (0, SAMPLE_PORT) and server.base_url.endswith(f":{server.port}")
    blocker.close()
    with _demo_server(tmp_path, None) as server:
        assert server.port == SAMPLE_PORT
    with _demo_server(tmp_path, 0) as server:  # explicitly any free port
        assert server.port != SAMPLE_PORT
