"""The training loop, run by every Ray Train worker, and :func:`train_stage`, which launches it.

One optimizer step = ``global_batch_size`` samples: ``micro_batch_size`` per worker per forward, accumulated
(gradient sync only on the last micro-batch) until the global batch is reached. Rank 0 writes, under the stage's
folder: ``metrics.jsonl`` (one line a step), ``checkpoints/step-NNNNNNN/`` (trainable weights as safetensors,
optimizer/scheduler/RNG state, the step, which fixes the data position) and ``latest`` naming the newest complete
checkpoint. A restarted worker group, or a re-run of a killed run, resumes from ``latest`` and reads the same
batches it would have read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from curation.fsutil import atomic_path, write_json
from curation.train.args import StageArgs, TrainConfig

CHECKPOINTS = "checkpoints"
WEIGHTS = "trainable.safetensors"
STATE = "trainer_state.pt"
FAIL_ENV = "CURATION_TRAIN_FAIL_AT_STEP"  # tests: crash a worker after this step to exercise resume


def stage_steps(stage: StageArgs, num_samples: int) -> int:
    """Optimizer steps of a stage: ``epochs`` passes over the data (at least one step), capped by ``max_steps``."""
    steps = max(1, math.floor(stage.epochs * num_samples / stage.global_batch_size))
    return min(steps, stage.max_steps) if stage.max_steps else steps


def lr_lambda(step: int, total: int, warmup_ratio: float) -> float:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0 (LLaVA's schedule)."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def latest_checkpoint(out: Path) -> Path | None:
    marker = out / CHECKPOINTS / "latest"
    if not marker.is_file():
        return None
    path = out / CHECKPOINTS / marker.read_text().strip()
    return path if (path / STATE).is_file() else None


def rng_state() -> dict[str, Any]:
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, rngs: list[dict[str, Any]], keep: int = 2
) -> Path:
    """Write a checkpoint atomically (a folder renamed into place, then ``latest`` updated); keep the newest
    ``keep``. ``rngs`` holds every rank's RNG state: ranks draw different amounts (dropout over batches of
    different shapes), so each resumes from its own."""
    import torch
    from safetensors.torch import save_file

    from curation.train.model import trainable_state

    name = f"step-{step:07d}"
    final = out / CHECKPOINTS / name
    tmp = out / CHECKPOINTS / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / WEIGHTS), metadata={"step": str(step)})
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
               tmp / STATE)  # fmt: skip
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    with atomic_path(out / CHECKPOINTS / "latest") as t:
        t.write_text(name)
    for old in sorted((out / CHECKPOINTS).glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model, path: Path) -> None:
    """Load trainable weights saved by :func:`save_checkpoint` (safetensors: no pickle)."""
    from safetensors.torch import load_file

    state = load_file(str(path / WEIGHTS) if path.is_dir() else str(path))
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{path}: checkpoint has weights the model does not: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False)


def load_projectors(model, path: Path) -> None:
    """Stage 2 starts from stage 1's projectors."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(path / WEIGHTS)).items() if k.startswith("projectors.")}
    model.load_state_dict(state, strict=False)


def _device_and_dtype(cfg: TrainConfig):
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return device, (torch.bfloat16 if bf16 else torch.float32)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train's ``train_loop_per_worker``)."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers

    from curation.train.data import ConversationDataset, GlobalBatchSampler, SampleRef, collate
    from curation.train.model import build_model, configure_trainable

    # Ray Train workers log INFO from the root logger: open_clip's and transformers' loading chatter, per worker
    logging.getLogger().setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()

    cfg: TrainConfig = loop_config["train"]
    stage_name: str = loop_config["stage"]
    stage: StageArgs = getattr(cfg, stage_name)
    out = Path(loop_config["out"])
    refs = [SampleRef(**r) for r in loop_config["refs"]]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device, dtype = _device_and_dtype(cfg)

    modalities = {r.modality for r in refs}
    model, tokenizer, info = build_model(cfg.model, modalities, device="cpu")
    if loop_config.get("init_from"):
        load_projectors(model, Path(loop_config["init_from"]))
    configure_trainable(model, stage)
    model.to(device)
    if dtype != torch.float32:
        model.llm.to(dtype)  # bf16 LM on GPU; projectors stay fp32 (they are small and train fast)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=stage.lr, weight_decay=stage.weight_decay)
    total = stage_steps(stage, len(refs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, total, stage.warmup_ratio))

    start = 0
    resume = latest_checkpoint(out)
    if resume is not None:
        load_weights(model, resume)
        state = torch.load(resume / STATE, weights_only=True)  # tensors and plain containers only: no code runs
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])  # another world size: no exact replay anyway
        start = state["step"]
    if rank == 0:
        _trim_metrics(out / "metrics.jsonl", start)

    strategy = "fsdp" if cfg.strategy == "fsdp" else "ddp"
    kwargs = {"use_orig_params": True} if strategy == "fsdp" else {}
    wrapped = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy=strategy,
                                            parallel_strategy_kwargs=kwargs)  # fmt: skip
    accum = stage.global_batch_size // (stage.micro_batch_size * world)
    context = min(cfg.model.max_length, info["context"])
    dataset = ConversationDataset(refs, tokenizer, stage.template, info["media_tokens"], info, context,
                                  cfg.model.video_frames, cfg.system_prompt)  # fmt: skip
    sampler = GlobalBatchSampler([r.length for r in refs], stage.global_batch_size, stage.micro_batch_size, world,
                                 rank, cfg.seed, total, start)  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.data_workers,
        collate_fn=functools.partial(collate, pad_id=pad_id),
        prefetch_factor=4 if cfg.data_workers else None,
        persistent_workers=False,
        worker_init_fn=_decode_worker,
        # its own generator: starting the loader must not draw from the global RNG that a resume restores
        # (dropout's), or a resumed run's randomness would be one draw off the uninterrupted run's
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batches = iter(loader)
    fail_at = loop_config.get("fail_at", 0)
    for step in range(start, total):
        t0 = time.perf_counter()
        waited = 0.0  # this rank's wait for its data loader
        stats = torch.zeros(3, device=device)  # loss sum, samples, tokens: one all-reduce for the step's metrics
        for micro in range(accum):
            t_data = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t_data
            media = {m: (i.to(device), x.to(device)) for m, (i, x) in batch["media"].items()}
            sync = micro == accum - 1
            with wrapped.no_sync() if world > 1 and not sync and hasattr(wrapped, "no_sync") else _null():
                loss = wrapped(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                               batch["labels"].to(device), media)  # fmt: skip
                (loss / accum).backward()
            stats += torch.stack([loss.detach().float(), torch.tensor(float(batch["samples"]), device=device),
                                  batch["attention_mask"].sum().to(device, torch.float32)])  # fmt: skip
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            torch.distributed.all_reduce(stats)
        loss_sum, samples, tokens = stats.tolist()
        seconds = time.perf_counter() - t0
        done = step + 1
        checkpoint = done % stage.checkpoint_every == 0 or done == total
        rngs: list[Any] = []
        if checkpoint:
            rngs = [rng_state()]
            if world > 1:
                rngs = [None] * world
                torch.distributed.all_gather_object(rngs, rng_state())
        if rank == 0:
            row = {"step": done, "loss": round(loss_sum / (accum * world), 6),
                   "lr": scheduler.get_last_lr()[0], "samples_per_s": round(samples / seconds, 3),
                   "samples": int(samples), "tokens": int(tokens), "seconds": round(seconds, 4),
                   "data_wait_seconds": round(waited, 4)}  # fmt: skip
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            if checkpoint:
                save_checkpoint(out, done, model, optimizer, scheduler, rngs)
        if world > 1 and (checkpoint or fail_at):
            # a checkpoint (or, in tests, rank 0's metrics line) is complete before any rank goes on or fails
            torch.distributed.barrier()
        if fail_at and done == fail_at and resume is None:
            raise RuntimeError(f"{FAIL_ENV}={fail_at}: injected failure after step {done}")


def _decode_worker(worker_id: int) -> None:
    """DataLoader worker set-up: keep the memory decoding frees, as the score stage's decode tasks do
    (:func:`curation.scoring.decode.keep_freed_memory`); an audio sample for transformers' default CLAP extractor
    took 19 ms with glibc's defaults, 10 ms with the setting. Only workers: the training process keeps the
    allocator's defaults."""
    from curation.scoring.decode import keep_freed_memory

    keep_freed_memory()


def evaluate(cfg: TrainConfig, template: str, refs: list, checkpoint: Path | None, batch_size: int = 16) -> float:
    """Mean per-sample loss of a checkpoint's weights on ``refs`` (in this process, no Ray)."""
    import torch

    from curation.train.data import ConversationDataset, collate
    from curation.train.model import build_model

    torch.manual_seed(cfg.seed)
    model, tokenizer, info = build_model(cfg.model, {r.modality for r in refs})
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    context = min(cfg.model.max_length, info["context"])
    dataset = ConversationDataset(refs, tokenizer, template, info["media_tokens"], info, context,
                                  cfg.model.video_frames, cfg.system_prompt)  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=cfg.data_workers,
                                         collate_fn=functools.partial(collate, pad_id=pad_id),
                                         worker_init_fn=_decode_worker)  # fmt: skip
    losses = []
    with torch.no_grad():
        for batch in loader:
            losses.append(float(model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])))
    return sum(losses) / max(1, len(losses))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _trim_metrics(path: Path, step: int) -> None:
    """A killed run may have logged steps past its last checkpoint; they are redone, so drop them."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))


def use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu in (True, "true"):
        return True
    if cfg.use_gpu in (False, "false"):
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def worker_count(cfg: TrainConfig, stage: StageArgs, gpus: float | None) -> int:
    """Ray Train workers to start: ``num_workers``, or, on GPUs (``gpus`` is the cluster's GPU count, ``None`` on
    CPU), at most one a GPU: each worker takes a whole GPU, and Ray Train would wait forever for a worker group
    the cluster cannot hold. Of those, the most that still divides the global batch into micro-batches (the
    global batch, and so the training, stay the same: fewer workers accumulate more micro-batches)."""
    from curation.config import ConfigError

    if gpus is None:
        return cfg.num_workers
    if gpus < 1:
        raise ConfigError(["train.use_gpu: true, but the Ray cluster has no GPU"])
    n = min(cfg.num_workers, int(gpus))
    while n > 1 and stage.global_batch_size % (stage.micro_batch_size * n):
        n -= 1
    if n < cfg.num_workers:
        logging.getLogger("curation").warning(
            "train: %d workers asked for, %s GPUs in the cluster: training on %d (global batch %d unchanged)",
            cfg.num_workers, int(gpus), n, stage.global_batch_size)  # fmt: skip
    return n


def train_stage(cfg: TrainConfig, stage_name: str, refs: list, out: Path, init_from: Path | None = None) -> dict:
    """Run one training stage on Ray Train (Ray must be initialised); returns a summary."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from curation.train.model import prepare_models

    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "train_config.json",
        {
            "stage": stage_name,
            "train": dataclasses.asdict(cfg),
            "samples": len(refs),
            "init_from": str(init_from) if init_from else None,
        },
    )
    prepare_models(cfg.model, {r.modality for r in refs})
    import ray

    gpu = use_gpu(cfg)
    workers = worker_count(cfg, getattr(cfg, stage_name), ray.cluster_resources().get("GPU", 0) if gpu else None)
    resources = {"GPU": 1, "CPU": cfg.num_cpus_per_worker} if gpu else {"CPU": cfg.num_cpus_per_worker}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "train": cfg,
            "stage": stage_name,
            "out": str(out),
            "refs": [dataclasses.asdict(r) for r in refs],
            "init_from": str(init_from) if init_from else None,
            # read here, in the driver: Ray Train workers do not inherit the driver's environment
            "fail_at": int(os.environ.get(FAIL_ENV, "0") or 0),
        },  # fmt: skip
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"train-{stage_name}",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),  # fmt: skip
    )
    started = time.time()
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"steps": len(rows), "first_loss": rows[0]["loss"] if rows else None,
            "last_loss": rows[-1]["loss"] if rows else None, "seconds": round(time.time() - started, 1),
            "checkpoint": str(latest_checkpoint(out))}  # fmt: skip
