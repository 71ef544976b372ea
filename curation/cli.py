"""The ``curation`` command line.

curation run PIPELINE.yaml --out RUN_DIR [--set key.path=value ...] [--address RAY_ADDRESS]
curation sample --out DIR [--seed N]
curation demo [--out runs/demo]
curation submit PIPELINE.yaml --address http://HOST:8265 --out RUN_DIR
curation <stage> RUN_DIR          one subcommand per stage (crawl, ...), run alone on a run directory
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

from curation.config import ConfigError, config_from_dict, load_config

log = logging.getLogger("curation")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override any config key, e.g. --set crawl.threads=8 (repeatable; values are parsed as YAML)",
    )  # fmt: skip


def _print_outputs(run_dir: Path, state: dict) -> None:
    counts = state.get("counts", {})
    print(f"\nrun {state.get('status')}: {run_dir}")
    print(f"  records: {counts.get('input')} in, {counts.get('kept')} kept, {counts.get('rejected')} rejected")
    for name, entry in state.get("stages", {}).items():
        summary = entry.get("summary", {})
        detail = summary.get("reasons") or "; ".join(  # the trainer's stages: steps and loss first -> last
            f"{k}: {v['steps']} steps, loss {v['first_loss']:.3f} -> {v['last_loss']:.3f}"
            for k, v in summary.items()
            if isinstance(v, dict) and v.get("last_loss") is not None
        )
        print(f"  {name:<8} {entry.get('status'):<9} {entry.get('seconds', '-')} s  {detail}")
    print(f"  ledger:  {run_dir / 'ledger.parquet'}")
    print(f"  run:     {run_dir / 'run.json'}")
    for name in state.get("stages", {}):
        print(f"  {name + ':':<8} {run_dir / name}")


def cmd_run(args: argparse.Namespace) -> int:
    from curation.runner import Run

    config = load_config(args.pipeline, args.overrides)
    run_dir = Path(args.out)
    state = Run(config, run_dir).run(address=args.address)
    _print_outputs(run_dir, state)
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    """Run one stage alone on an existing run directory (its config comes from run.json)."""
    from curation.config import apply_overrides
    from curation.runner import Run

    run_dir = Path(args.run_dir)
    state_path = run_dir / "run.json"
    if not state_path.is_file():
        raise ConfigError([f"{run_dir}: no run.json; start the run with `curation run PIPELINE.yaml --out {run_dir}`"])
    data = json.loads(state_path.read_text())["config"]
    overrides = list(args.overrides)
    if getattr(args, "out", None):  # `curation release RUN_DIR --out URL`
        overrides.append(f"release.out={json.dumps(args.out)}")
    if getattr(args, "recipe", None):  # `curation filter RUN_DIR --recipe filters/laion.yaml`
        overrides.append(f"filter.recipe={json.dumps(args.recipe)}")
    config = config_from_dict(apply_overrides(data, overrides))
    if args.stage not in config.stages:
        config.stages = [s for s in config.stages if s != args.stage] + [args.stage]
    from curation.stages import get_stage

    if getattr(args, "json", False) and not getattr(args, "dry_run", False):
        raise ConfigError(["--json: only with --dry-run"])
    if getattr(args, "dry_run", False):  # `curation filter RUN_DIR --recipe X --dry-run`
        return _preview_filter(run_dir, config, as_json=args.json)
    prepare = getattr(get_stage(args.stage), "prepare_rerun", None)
    if prepare is not None:  # e.g. re-filtering a finished run with another recipe
        prepare(run_dir, config, reset_later=getattr(args, "reset_later", False))
    state = Run(config, run_dir).run(address=args.address, only=[args.stage])
    _print_outputs(run_dir, state)
    return 0


def _preview_filter(run_dir: Path, config, as_json: bool = False) -> int:
    """Print what the filter recipe would keep of a run, from its stored scores, writing nothing (``as_json``: as
    one JSON object, :meth:`FilterStage.preview`'s)."""
    from curation.stages.base import StageContext
    from curation.stages.filter import FilterStage

    if not (run_dir / "ledger.parquet").is_file():
        raise ConfigError([f"{run_dir}: no ledger.parquet yet; run the score stage first"])
    stage = FilterStage(StageContext(run_dir.resolve(), config))
    p = stage.preview()
    if as_json:
        print(json.dumps(p, indent=2))
        return 0
    recipe = p["recipe"]
    print(f"filter preview (nothing written): recipe {recipe['name']} v{recipe['version']} ({recipe['path']})")
    print(f"  {p['input']} records given to the filter: {p['kept']} would be kept, {p['rejected']} rejected")
    for modality, counts in p["by_modality"].items():
        print(f"  {modality:<6} {counts.get('kept', 0):>9} kept {counts.get('rejected', 0):>9} rejected")
    for reason, n in p["reasons"].items():
        print(f"  rejected as {reason}: {n}")
    for cut in p["cuts"]:
        print(f"  cut: {cut['signal']} {cut['value']:.4g} for {cut['modality']} ({cut['rule']})")
    done = stage.success_path
    if done.is_file():
        now = json.loads(done.read_text())["summary"]
        print(f"  now: recipe {now['recipe']['name']} v{now['recipe']['version']} keeps {now['kept']} of "
              f"{now['input']}")  # fmt: skip
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from curation.sample import SampleServer, generate_sample, write_url_lists

    summary = generate_sample(args.out, seed=args.seed, progress=True)
    if args.serve:
        with SampleServer(args.out, port=args.port) as server:
            paths = write_url_lists(args.out, server.base_url)
            print(f"serving {args.out} at {server.base_url}; URL lists: {', '.join(map(str, paths.values()))}")
            print("Ctrl-C to stop")
            try:
                import threading

                threading.Event().wait()
            except KeyboardInterrupt:
                pass
        return 0
    paths = write_url_lists(args.out, args.base_url)
    print(json.dumps({k: v for k, v in summary.items() if k != "paths"}, indent=2, default=str))
    print(f"sample written to {args.out}; URL lists (base {args.base_url}): {', '.join(map(str, paths.values()))}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the embedded sample, serve it on loopback, and run pipelines/demo.yaml on it."""
    import shutil

    from curation.runner import Run
    from curation.sample import generate_sample, write_url_lists

    sample_dir = Path(args.sample)
    marker = sample_dir / "sample.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("seed") != args.seed:
        log.info("demo: generating the embedded sample in %s", sample_dir)
        generate_sample(sample_dir, seed=args.seed, progress=True)
    with _demo_server(sample_dir, args.port) as server:
        urls = write_url_lists(sample_dir, server.base_url)["parquet"]
        overrides = [f"input.path={urls}", *args.overrides]
        config = load_config(args.pipeline, overrides)
        run_dir = Path(args.out)
        try:
            state = Run(config, run_dir).run()
        except ConfigError as e:
            # the sample server's port (part of every URL) changed since the last demo: start the demo afresh
            if "other input settings" not in str(e):
                raise
            log.info("demo: %s was made on another URL list; starting it afresh", run_dir)
            shutil.rmtree(run_dir)
            state = Run(config, run_dir).run()
    _print_outputs(run_dir, state)
    print(f"\nsample data: {sample_dir} (labels: {sample_dir / 'labels.parquet'})")
    return 0


SAMPLE_PORT = 8642  # fixed, so the demo's URLs (and its uids, shards and training batches) are the same every run


def _demo_server(sample_dir: Path, port: int | None):
    """The demo's sample server: on ``port`` when given (0: any free port), else on :data:`SAMPLE_PORT`, or on any
    free port when that one is taken (the run is then complete and correct, but its uids differ from a default
    demo's, as every URL holds the port)."""
    import errno

    from curation.sample import SampleServer

    server = SampleServer(sample_dir, port=SAMPLE_PORT if port is None else port)
    try:
        return server.start()
    except OSError as e:
        if port is not None or e.errno != errno.EADDRINUSE:
            raise
    log.warning("demo: port %d is in use; serving the sample on a free port instead (record uids will differ "
                "from a default demo's)", SAMPLE_PORT)  # fmt: skip
    return SampleServer(sample_dir, port=0).start()


def _use_ray_auth_token() -> None:
    """Ray clusters started with token authentication (Ray's default for new clusters) refuse clients without
    the token; the client only sends it in token mode. Turn that on when a token is at hand, so `curation
    submit` works against an authenticated cluster without the user knowing Ray's variable names."""
    import os

    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit ``curation run`` as a Ray job; the project folder travels as the job's working_dir."""
    import time

    _use_ray_auth_token()  # before importing ray, which reads the mode once
    from ray.job_submission import JobStatus, JobSubmissionClient

    load_config(args.pipeline, args.overrides)  # fail here, not on the cluster, when the recipe is wrong
    entrypoint = shlex.join(
        ["python", "-m", "curation.cli", "run", args.pipeline, "--out", args.out]
        + [x for o in args.overrides for x in ("--set", o)]
    )
    runtime_env: dict = {"working_dir": str(args.working_dir), "excludes": [".venv", "runs", ".git", "*.tar"]}
    client = JobSubmissionClient(args.address)
    # a head that has just started answers before its job agent is up: retry that one error for a while
    deadline = time.monotonic() + 120
    while True:
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {job_id} to {args.address}: {entrypoint}")
    if args.no_wait:
        return 0
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            print(f"job {job_id}: {status.value}")
            return 0 if status == JobStatus.SUCCEEDED else 1
        time.sleep(2)


def cmd_models_bootstrap(args: argparse.Namespace) -> int:
    from curation.models.bootstrap import KINDS, bootstrap

    for kind, path in bootstrap(args.only or KINDS, force=args.force).items():
        print(f"{kind:<5} {path}")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from curation.models import list_models

    models = list_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    for m in models:
        if m["kind"] == "shipped":
            state = "installed" if m["cached"] else "missing"
        else:
            state = "cached" if m["cached"] else "not trained yet: curation models bootstrap"
        print(f"{m['name']:<22} {m['description']}\n{'':<22} {m['path']}  [{state}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from curation.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="curation",
        description="Curate multimodal (image, video, audio)-text data on Ray: crawl, deduplicate, score, filter, "
        "format, release and train. Every subcommand has --help.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="run a pipeline; re-running on the same --out resumes",
        description="Run PIPELINE.yaml into RUN_DIR. Re-running on the same RUN_DIR skips completed "
        "stages and shards and finishes the rest. Outputs: run.json, ledger.parquet, one folder a stage.",
    )
    p.add_argument("pipeline", help="a pipeline recipe, e.g. pipelines/demo.yaml")
    p.add_argument("--out", required=True, help="run directory (created; resumed if it exists)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray instance)")
    _add_set(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sample",
        help="write the embedded sample data set (media, captions, labelled defects)",
        description="Generate the embedded sample: images, short videos and audio clips with captions, "
        "URL lists (parquet, csv, jsonl) and labels.parquet marking every injected defect.",
    )
    p.add_argument("--out", required=True, help="folder to write the sample to")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    p.add_argument("--base-url", default=f"http://127.0.0.1:{SAMPLE_PORT}",
                   help="server address written into the URL lists")  # fmt: skip
    p.add_argument("--serve", action="store_true", help="also serve it on loopback until Ctrl-C")
    p.add_argument("--port", type=int, default=SAMPLE_PORT, help="port for --serve")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "demo",
        help="generate and serve the sample, then run pipelines/demo.yaml on it",
        description="The one-command tour: writes the embedded sample, serves it on 127.0.0.1, runs "
        "pipelines/demo.yaml through every stage and prints where the outputs are.",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--sample", default="runs/sample", help="sample folder (default: runs/sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None,
                   help=f"sample server port (default: {SAMPLE_PORT}, or any free port when it is taken; 0: any free "
                   "port). The port is part of every URL, so a fixed one gives the same uids, shards and training "
                   "batches every run")  # fmt: skip
    p.add_argument("--pipeline", default=str(REPO_ROOT / "pipelines" / "demo.yaml"))
    _add_set(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "submit",
        help="submit a pipeline run as a Ray job to a cluster",
        description="Submit `curation run PIPELINE --out RUN_DIR` to a Ray cluster's job server; "
        "the current folder is shipped as the job's working_dir. RUN_DIR is a path on the cluster.",
    )
    p.add_argument("pipeline")
    p.add_argument("--address", required=True, help="job server, e.g. http://HOST:8265")
    p.add_argument("--out", required=True, help="run directory as seen by the cluster (shared storage)")
    p.add_argument("--working-dir", default=".", help="folder shipped to the cluster (default: .)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    _add_set(p)
    p.set_defaults(func=cmd_submit)

    for name, stage in STAGES.items():
        p = sub.add_parser(
            name,
            help=f"run the {name} stage alone: {stage.help}",
            description=f"Run the {name} stage alone on RUN_DIR (its config comes from RUN_DIR/run.json, "
            f"adjusted by --set): {stage.help}.",
        )
        p.add_argument("run_dir")
        p.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
        if name == "release":
            p.add_argument("--out", default=None, metavar="DIR_OR_URL",
                           help="also publish the release to this folder or fsspec URL (s3://bucket/prefix); "
                           "the same as --set release.out=...")  # fmt: skip
        if name == "filter":
            p.add_argument("--recipe", default=None, help="re-filter with this filter recipe (a name in filters/ or "
                           "a YAML path) from the stored scores; the same as --set filter.recipe=...")  # fmt: skip
            p.add_argument(
                "--reset-later",
                action="store_true",
                help="also reset stages that ran after the previous filter (format, release, ...)",
            )
            p.add_argument("--dry-run", action="store_true",
                           help="print what the recipe would keep and reject (per modality, per reason, and its "
                           "percentile cuts) from the stored scores, and change nothing in the run")  # fmt: skip
            p.add_argument("--json", action="store_true", help="with --dry-run: print it as one JSON object")
        _add_set(p)
        p.set_defaults(func=cmd_stage, stage=name)

    p = sub.add_parser("models", help="the embedded models: train (bootstrap) or list them",
                       description="Models the scorers use when none is configured: tiny image-text, audio-text and "
                       "language models trained here on generated data (nothing is downloaded), cached in "
                       "$CURATION_CACHE or ~/.cache/curation/models.")  # fmt: skip
    msub = p.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    q = msub.add_parser("bootstrap", help="train the embedded models (cached; a few minutes on 2 CPU cores)")
    q.add_argument("--only", action="append", choices=["clip", "clap", "lm"], help="train only these (repeatable)")
    q.add_argument("--force", action="store_true", help="retrain even if cached")
    q.set_defaults(func=cmd_models_bootstrap)
    q = msub.add_parser("list", help="list the embedded models, where they are cached, and the shipped text models")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_models_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    from curation.runner import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"curation: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"curation: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
