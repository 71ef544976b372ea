"""Trainer throughput: samples/s of stage 1 or 2 on a release, and on a GPU the model FLOPs utilisation
(6 x parameters x tokens / time / the device's peak bf16 FLOPs).

    .venv/bin/python benchmarks/train.py --release runs/demo/release --stage pretrain --steps 10
    .venv/bin/python benchmarks/train.py --steps 10         # builds a small release from a generated sample
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "V100": 125e12}  # fmt: skip


def peak_flops() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--release", default=None, help="a release folder (default: build one from a generated sample)")
    p.add_argument("--stage", choices=("pretrain", "instruct"), default="pretrain")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--n-image", type=int, default=64)
    args = p.parse_args()

    import ray

    from curation.train.args import StageArgs, TrainConfig
    from curation.train.data import index_shards
    from curation.train.loop import train_stage
    from curation.train.model import build_model

    work = Path(tempfile.mkdtemp(prefix="curation-train-bench-"))
    ray.init(include_dashboard=False, logging_level="WARNING")
    try:
        release = Path(args.release) if args.release else _small_release(work, args.n_image)
        refs = index_shards(sorted(release.glob("*.tar")))
        defaults = TrainConfig()
        stage = dataclasses.replace(getattr(defaults, args.stage), global_batch_size=args.global_batch,
                                    micro_batch_size=args.micro_batch, max_steps=args.steps, epochs=1000.0,
                                    checkpoint_every=args.steps)  # fmt: skip
        other = "instruct" if args.stage == "pretrain" else "pretrain"
        cfg = dataclasses.replace(defaults, num_workers=args.workers, **{args.stage: stage},
                                  **{other: StageArgs(enabled=False)})  # fmt: skip
        train_stage(cfg, args.stage, refs, work / args.stage)
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (work / args.stage / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step pays for worker start-up and the first decode
    sps = statistics.median(r["samples_per_s"] for r in steady)
    tokens_per_s = statistics.median(r["tokens"] / r["seconds"] for r in steady)
    model, _, _ = build_model(cfg.model, {r.modality for r in refs})
    params = sum(p.numel() for p in model.parameters())
    device, peak = peak_flops()
    print(f"train benchmark: stage {args.stage}, {len(refs)} samples, {args.steps} steps x {args.global_batch} "
          f"samples, {args.workers} workers on {device}")  # fmt: skip
    print(f"  samples/s (median of steps 2..{len(rows)}): {sps:.2f}")
    print(f"  tokens/s: {tokens_per_s:.0f}; parameters (towers + projectors + LM): {params:,}")
    if peak is None:
        print("  MFU: n/a on CPU" if device == "cpu" else f"  MFU: n/a (no peak FLOPs known for {device})")
    else:
        # every worker has its own GPU: the peak scales with the workers
        print(f"  MFU: {6 * params * tokens_per_s / (peak * args.workers):.2%} (peak {peak / 1e12:.0f} TFLOP/s bf16)")
    return 0


def _small_release(work: Path, n_image: int) -> Path:
    from curation.config import load_config
    from curation.runner import Run
    from curation.sample import generate_sample, media_folder

    generate_sample(work / "sample", seed=0, n_image=n_image, n_video=n_image // 8, n_audio=n_image // 8,
                    defect_rate=0.0)  # fmt: skip
    media = media_folder(work / "sample", work / "media")
    config = load_config(data={"name": "bench", "stages": ["crawl", "format", "release"], "input": {"path": str(media)},
                               "crawl": {"shard_size": 100}})  # fmt: skip
    Run(config, work / "run").run()
    return work / "run" / "release"


if __name__ == "__main__":
    raise SystemExit(main())
