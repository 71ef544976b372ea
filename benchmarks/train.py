"""Trainer throughput: samples/s of stage 1 or 2 on a release, beside its bound, and on a GPU the model FLOPs
utilisation: model FLOPs per token x tokens/s / the devices' peak bf16 FLOP/s. Model FLOPs per token count
6 x the parameters that train (forward, input and weight gradients) and 4 x the LM's frozen ones (forward and
input gradients: stage 1 back-propagates through the frozen LM to the projectors, but computes no weight
gradients there); the frozen towers run once per media item without gradients and are left out.

The bound, measured in the same run: the same model's bare training step (forward, backward, optimizer step) in
this process on micro-batches decoded beforehand and held in memory, with the threads one worker gets, times the
number of workers (ideal data parallelism, no data loading, no gradient sync). The ratio shows what data loading,
DDP and Ray Train cost.

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
    from curation.train.model import build_model, configure_trainable

    work = Path(tempfile.mkdtemp(prefix="curation-train-bench-"))
    # with the dashboard, as the runner starts Ray by default: Ray Train's placement-group cleaner watches its
    # controller through the state API the dashboard serves, and warns every few seconds without it
    ray.init(address="local", include_dashboard=True, logging_level="WARNING")
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
    bare = bare_samples_per_s(cfg, args.stage, refs, args.micro_batch, args.steps)
    rows = [json.loads(x) for x in (work / args.stage / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows  # the first step pays for worker start-up and the first decode
    sps = statistics.median(r["samples_per_s"] for r in steady)
    tokens_per_s = statistics.median(r["tokens"] / r["seconds"] for r in steady)
    model, _, _ = build_model(cfg.model, {r.modality for r in refs})
    configure_trainable(model, getattr(cfg, args.stage))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_lm = sum(p.numel() for p in model.llm.parameters() if not p.requires_grad)
    flops_per_token = 6 * trainable + 4 * frozen_lm
    device, peak = peak_flops()
    print(f"train benchmark: stage {args.stage}, {len(refs)} samples, {args.steps} steps x {args.global_batch} "
          f"samples, {args.workers} workers on {device}")  # fmt: skip
    print(f"  samples/s (median of steps 2..{len(rows)}): {sps:.2f}")
    if all("data_wait_seconds" in r for r in steady):  # rank 0's wait for its data loader, a share of its steps
        waited = sum(r["data_wait_seconds"] for r in steady) / sum(r["seconds"] for r in steady)
        print(f"  rank 0 waited for its data loader {waited:.0%} of steps 2..{len(rows)}")
    print(f"  bound: bare step on in-memory batches x {args.workers} workers: {bare * args.workers:.2f} samples/s; "
          f"ratio {sps / (bare * args.workers):.2f}")  # fmt: skip
    print(f"  tokens/s: {tokens_per_s:.0f}; parameters: {trainable:,} trained, {frozen_lm:,} frozen in the LM; "
          f"{flops_per_token * tokens_per_s / 1e9:.2f} model GFLOP/s")  # fmt: skip
    if peak is None:
        print("  MFU: n/a on CPU" if device == "cpu" else f"  MFU: n/a (no peak FLOPs known for {device})")
    else:
        # every worker has its own GPU: the peak scales with the workers
        mfu = flops_per_token * tokens_per_s / (peak * args.workers)
        print(f"  MFU: {mfu:.2%} (peak {peak / 1e12:.0f} TFLOP/s bf16 per GPU)")
    return 0


def bare_samples_per_s(cfg, stage_name: str, refs: list, micro_batch: int, steps: int) -> float:
    """Samples/s of one worker's bare training step (median over ``steps``) on pre-decoded micro-batches."""
    import time

    import torch

    from curation.train.data import ConversationDataset, collate
    from curation.train.model import build_model, configure_trainable

    torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    stage = getattr(cfg, stage_name)
    model, tokenizer, info = build_model(cfg.model, {r.modality for r in refs})
    configure_trainable(model, stage)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr)
    dataset = ConversationDataset(refs, tokenizer, stage.template, info["media_tokens"], info,
                                  min(cfg.model.max_length, info["context"]), cfg.model.video_frames)  # fmt: skip
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [collate([dataset[j] for j in range(i, min(i + micro_batch, len(refs)))], pad_id=pad)
               for i in range(0, len(refs), micro_batch)]  # fmt: skip
    times = []
    for step in range(steps + 1):
        batch = batches[step % len(batches)]
        t0 = time.perf_counter()
        loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(batch["samples"] / (time.perf_counter() - t0))
    return statistics.median(times[1:])  # the first step pays for lazy initialisation


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
