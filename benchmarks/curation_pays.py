"""Does curation pay? The mission in one number.

Two projectors are pre-trained (stage 1) with the same steps, batch and seed: one on the curated release, one on
the uncurated crawl (everything that decoded, with its mismatched, gibberish and non-English captions and its
duplicates). Both are then scored on a clean held-out split: clean items of a sample with another seed. Lower
held-out loss is better.

    .venv/bin/python benchmarks/curation_pays.py --steps 30
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_pipeline(media: Path, run_dir: Path, stages: list[str]) -> Path:
    from curation.config import load_config
    from curation.runner import Run

    config = load_config(data={"name": run_dir.name, "stages": stages, "input": {"path": str(media)},
                               "crawl": {"shard_size": 100}})  # fmt: skip
    Run(config, run_dir).run()
    return run_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--n-image", type=int, default=120)
    p.add_argument("--n-video", type=int, default=0)
    p.add_argument("--n-audio", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()

    import ray

    from curation.sample import generate_sample, media_folder
    from curation.stages import STAGES
    from curation.train.args import StageArgs, TrainConfig
    from curation.train.data import index_shards
    from curation.train.loop import evaluate, latest_checkpoint, train_stage

    work = Path(args.work or tempfile.mkdtemp(prefix="curation-pays-"))
    sizes = {"n_image": args.n_image, "n_video": args.n_video, "n_audio": args.n_audio}
    t0 = time.time()
    generate_sample(work / "sample", seed=0, **sizes)
    generate_sample(work / "heldout-sample", seed=1, **sizes)
    filtering = "score" in STAGES and "filter" in STAGES
    # with the dashboard, as the runner starts Ray by default: Ray Train's placement-group cleaner watches its
    # controller through the state API the dashboard serves, and warns every few seconds without it
    ray.init(address="local", include_dashboard=True, logging_level="WARNING")
    try:
        uncurated = run_pipeline(media_folder(work / "sample", work / "media-all", lambda r: True),
                                 work / "uncurated", ["crawl"])  # fmt: skip
        if filtering:
            stages = [s for s in ("crawl", "score", "dedup", "filter", "format", "release") if s in STAGES]
            curated = run_pipeline(work / "media-all", work / "curated", stages)
            how = f"the pipeline with filtering: {' -> '.join(stages)}"
        else:
            # the score and filter stages are not in this checkout: keep what they are meant to keep
            curated = run_pipeline(media_folder(work / "sample", work / "media-clean", lambda r: r["defect"] is None),
                                   work / "curated", ["crawl", "format", "release"])  # fmt: skip
            how = "EMULATED with labels.parquet's clean flag (score/filter stages not available)"
        heldout = run_pipeline(media_folder(work / "heldout-sample", work / "media-heldout",
                                            lambda r: r["defect"] is None), work / "heldout", ["crawl"])  # fmt: skip
        sets = {
            "uncurated": index_shards(sorted((uncurated / "crawl" / "shards").glob("*.tar"))),
            "curated": index_shards(sorted((curated / "release").glob("*.tar"))),
        }
        heldout_refs = index_shards(sorted((heldout / "crawl" / "shards").glob("*.tar")))
        stage = StageArgs(lr=args.lr, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                          max_steps=args.steps, epochs=1000.0, checkpoint_every=args.steps)  # fmt: skip
        cfg = TrainConfig(num_workers=2, seed=args.seed, pretrain=stage,
                          instruct=dataclasses.replace(stage, enabled=False))  # fmt: skip
        results = {}
        for name, refs in sets.items():
            summary = train_stage(cfg, "pretrain", refs, work / "train" / name)
            ckpt = latest_checkpoint(work / "train" / name)
            results[name] = (len(refs), summary["last_loss"], evaluate(cfg, "plain", heldout_refs, ckpt))
        untrained = evaluate(cfg, "plain", heldout_refs, None)
    finally:
        ray.shutdown()

    print(f"curation pays: stage-1 projector, {args.steps} steps x {args.global_batch} samples, seed {args.seed}, "
          f"2 Ray Train workers")  # fmt: skip
    print(f"  curated set: {how}")
    print(f"  held-out: {len(heldout_refs)} clean items of sample seed 1 (training sample: seed 0)")
    print(f"  {'set':<10} {'samples':>8} {'train loss':>11} {'held-out loss':>14}")
    for name, (n, train_loss, held) in results.items():
        print(f"  {name:<10} {n:>8} {train_loss:>11.4f} {held:>14.4f}")
    print(f"  {'untrained':<10} {'':>8} {'':>11} {untrained:>14.4f}")
    gain = results["uncurated"][2] - results["curated"][2]
    print(f"  held-out loss, uncurated - curated: {gain:+.4f} ({'curation pays' if gain > 0 else 'NO GAIN'})")
    print(f"  ({time.time() - t0:.0f} s; work folder {work})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
