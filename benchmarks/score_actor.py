"""Where the CLIP scorer actor's time goes: its call on the score stage's own batches against its parts, in one
process, and as several processes sharing the device.

    .venv/bin/python benchmarks/score_actor.py [--device auto|cpu|cuda] [--clip bootstrap|ViT-B-32|ViT-L-14]
        [--modality image|video] [--records N] [--batch N] [--processes 1 2 4] [--profile ROWS]

The inputs are what the stage hands its CLIP actor: the sample's clean media, crawled into shards, then indexed
and decoded by the stage's own batch functions (``index_shard``, ``decode_batch``, and with a GPU
``add_clip_tokens``), under the plan the stage uses on that device (with a GPU the pixels go as decoded and the
actor resizes them). In one process, with the actor's own torch thread count, it times per batch:

- the actor's whole call (``ClipSimilarityScorer.__call__``: Arrow in, scores and embeddings out);
- its parts on their own: the resize of the batch's pixels on the device (GPU plan), the captions' tokens (CPU
  plan, where the actor tokenizes), the image forward and the text forward on inputs already on the device;
- the bare forward (image and text forward), as ``benchmarks/score.py`` times it;

and prints the call less those parts as "rest" (reading Arrow, copies to the device, normalising, pooling,
writing the columns; a difference of timings, so where that work is small it can come out slightly negative). Then ``--processes`` counts of processes each run the actor's call in a loop over the same
batches, started together: their summed rate says whether more actors a device would help (the stage runs two
a GPU). ``bootstrap`` is the embedded tiny CLIP; an open_clip architecture gets random weights saved to a local
file, as ``benchmarks/score.py --size base`` does.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import score as bench  # noqa: E402  (benchmarks/score.py: the sample, crawl and checkpoint helpers)

MIN_SECONDS = 2.0  # each timing repeats its work for at least this long, after one untimed pass


def actor_spec(clip: str, folder: Path, batch: int, gpu: bool):
    """The ``score.image_text`` model the actor loads, with the stage's default CPU reservation."""
    from curation.config import ScoreConfig
    from curation.stages.score import CPU_ACTOR_CPUS, GPU_ACTOR_CPUS

    cpus = GPU_ACTOR_CPUS if gpu else CPU_ACTOR_CPUS
    if clip == "bootstrap":
        return ScoreConfig.Model(batch_size=batch, num_cpus=cpus)
    path = bench.clip_checkpoint(folder, clip)
    return ScoreConfig.Model(name=clip, path=str(path), batch_size=batch, num_cpus=cpus)


def actor_batches(spec, run_dir: Path, config, batch: int, gpu: bool):
    """The actor's input batches, made by the stage's own steps from the crawled run."""
    import pyarrow as pa

    from curation.models.clip import clip_preprocess_cfg, resolve_clip
    from curation.scoring.clip_similarity import add_clip_tokens
    from curation.scoring.decode import DecodePlan, decode_batch
    from curation.stages.base import StageContext
    from curation.stages.score import ScoreStage, index_shard

    records = ScoreStage(StageContext(run_dir.resolve(), config)).kept_records()
    items = pa.table({"shard": list(records), "uids": [t.column("uid").to_pylist() for t in records.values()]})
    block = index_shard(items, str(run_dir / "crawl"))
    cfg = clip_preprocess_cfg(resolve_clip(spec))
    plan = DecodePlan(image=cfg, video=cfg, video_frames=config.score.video_frames, pixels_as_decoded=gpu)
    out = []
    for start in range(0, block.num_rows, batch):
        decoded = decode_batch(block.slice(start, batch), plan)
        out.append(add_clip_tokens(decoded, spec) if gpu else decoded)
    return out


def timed(fn, sync, records: int) -> float:
    """Seconds a record of ``fn()`` (one pass over ``records`` records), over at least :data:`MIN_SECONDS`."""
    fn()
    sync()
    calls, started = 0, time.perf_counter()
    while calls < 1 or time.perf_counter() - started < MIN_SECONDS:
        fn()
        sync()
        calls += 1
    return (time.perf_counter() - started) / (calls * records)


def breakdown(spec, batches, gpu: bool) -> dict[str, Any]:
    """Milliseconds a batch of the actor's call and of its parts (see the module's notes)."""
    import torch

    from curation.scoring.clip_similarity import ClipSimilarityScorer
    from curation.scoring.decode import ImagePreprocessor, frame_runs, media_rows, row_inputs

    actor = ClipSimilarityScorer(spec, has_gpu=gpu)
    sync = torch.cuda.synchronize if actor.device.startswith("cuda") else (lambda: None)
    pre, device = actor.preprocess, actor.device
    inputs, texts = [], []
    for b in batches:
        todo, rows = media_rows(b, actor.modalities)
        inputs.append(row_inputs(b, rows, todo))
        texts.append(actor.text_inputs(b, rows, todo))
    records = sum(len(x) for x in inputs)
    per_batch = records / len(batches)
    needs_resize = any(f.shape[1:3] != pre.hw for x in inputs for f in frame_runs(x))
    pixels = [pre.resized(x, device) if needs_resize else frame_runs(x) for x in inputs]
    images = [ImagePreprocessor.to_tensor(p, pre.mean, pre.std, device, actor.dtype) for p in pixels]
    tokens = [
        torch.from_numpy(t).to(device).long() if not isinstance(t, list) else actor.tokenizer(t).to(device)
        for t in texts
    ]

    def forward(which):
        def run():
            with torch.inference_mode():
                for x, t in zip(images, tokens):
                    if which in ("image", "both"):
                        actor.model.encode_image(x)
                    if which in ("text", "both"):
                        actor.model.encode_text(t)

        return run

    ms = {"call": timed(lambda: [actor(b) for b in batches], sync, records)}
    if needs_resize:
        ms["resize"] = timed(lambda: [pre.resized(x, device) for x in inputs], sync, records)
    if any(isinstance(t, list) for t in texts):
        ms["tokenize"] = timed(lambda: [actor.tokenizer(t) for t in texts if isinstance(t, list)], sync, records)
    ms["image forward"] = timed(forward("image"), sync, records)
    ms["text forward"] = timed(forward("text"), sync, records)
    bare = timed(forward("both"), sync, records)
    ms = {k: v * per_batch * 1e3 for k, v in ms.items()}
    ms["rest"] = ms["call"] - sum(v for k, v in ms.items() if k != "call")
    call_rps = per_batch / ms["call"] * 1e3
    return {"device": device, "records": records, "batch": round(per_batch, 1), "ms_per_batch": ms,
            "call_rps": call_rps, "bare_rps": 1 / bare, "ratio": call_rps * bare}  # fmt: skip


def _loop(spec, ipc: str, gpu: bool, seconds: float, barrier, results) -> None:
    """One process: the actor's call in a loop over the batches saved at ``ipc``, for ``seconds`` after all start."""
    import pyarrow as pa
    import torch

    from curation.scoring.clip_similarity import ClipSimilarityScorer

    with pa.memory_map(ipc) as source:
        table = pa.ipc.open_file(source).read_all()
    sizes = json.loads(table.schema.metadata[b"batches"])
    batches, at = [], 0
    for n in sizes:
        batches.append(table.slice(at, n))
        at += n
    actor = ClipSimilarityScorer(spec, has_gpu=gpu)
    sync = torch.cuda.synchronize if actor.device.startswith("cuda") else (lambda: None)
    for b in batches:
        actor(b)
    sync()
    barrier.wait()
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for b in batches:
            actor(b)
            n += b.num_rows
    sync()
    results.put(n / (time.perf_counter() - started))


def processes_rate(spec, batches, gpu: bool, counts: list[int], folder: Path, seconds: float) -> dict[int, float]:
    """Summed records/s of ``k`` processes running the actor's call at once, for each ``k`` in ``counts``."""
    import pyarrow as pa

    table = pa.concat_tables(batches)
    meta = {b"batches": json.dumps([b.num_rows for b in batches]).encode()}
    ipc = folder / "batches.arrow"
    with pa.OSFile(str(ipc), "wb") as sink, pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
        writer.write_table(table)
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    out = {}
    for k in counts:
        barrier, results = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=_loop, args=(spec, str(ipc), gpu, seconds, barrier, results)) for _ in range(k)]
        for p in procs:
            p.start()
        rates = [results.get() for _ in procs]
        for p in procs:
            p.join()
        out[k] = sum(rates)
    return out


def profiled(spec, batches, gpu: bool, rows: int) -> dict[str, Any]:
    """One pass of the actor's call over ``batches`` (after an untimed one) under torch's profiler: its ``rows``
    most expensive ops by their own device time (GPU) or CPU time, and on a GPU how much of the pass's wall time
    the device was busy. A device busy for a small share of the pass means the actor's host work paces it."""
    import torch

    from curation.scoring.clip_similarity import ClipSimilarityScorer

    actor = ClipSimilarityScorer(spec, has_gpu=gpu)
    sync = torch.cuda.synchronize if actor.device.startswith("cuda") else (lambda: None)
    for b in batches:
        actor(b)
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for b in batches:
            actor(b)
        sync()
    wall_ms = (time.perf_counter() - started) * 1e3
    ops = prof.key_averages()
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    busy_ms = sum(getattr(e, key) for e in ops) / 1e3 if gpu else None
    return {"table": ops.table(sort_by=key, row_limit=rows, max_name_column_width=48), "wall_ms": wall_ms,
            "device_busy_ms": busy_ms, "batches": len(batches)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="cuda: the actor on the GPU in fp16, with a GPU stage's decode plan (auto: cuda if present)")  # fmt: skip
    ap.add_argument(
        "--clip", default="bootstrap", help="bootstrap (the embedded tiny CLIP) or an open_clip architecture"
    )
    ap.add_argument("--modality", choices=["image", "video"], default="image")
    ap.add_argument("--records", type=int, default=None, help="clean records (default: 1024 images or 128 clips)")
    ap.add_argument("--batch", type=int, default=None, help="records a batch (default: the benchmark's: 64 images or 8 "
                    "clips on CPU, 4x that on a GPU)")  # fmt: skip
    ap.add_argument("--processes", type=int, nargs="*", default=None,
                    help="process counts for the shared-device loop (default: 1 2 on CPU, 1 2 4 on a GPU; none: skip)")  # fmt: skip
    ap.add_argument("--seconds", type=float, default=8.0, help="each process count's loop")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also profile one pass of the actor's call: its ROWS most expensive ops, and on a GPU the "
                    "share of the pass the device was busy")  # fmt: skip
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    import ray
    import torch

    from curation.models.bootstrap import bootstrap
    from curation.sample import generate_sample

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU on this machine")
    video = args.modality == "video"
    records = args.records or (128 if video else 1024)
    batch = args.batch or (8 if video else 64) * (bench.GPU_BATCH if gpu else 1)
    counts = args.processes if args.processes is not None else ([1, 2, 4] if gpu else [1, 2])
    if args.clip == "bootstrap":
        bootstrap(["clip"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-actor-"))
    try:
        generate_sample(tmp / "sample", seed=7, n_image=0 if video else records, n_video=records if video else 0,
                        n_audio=0, defect_rate=0.0)  # fmt: skip
        folder = bench.clean_media(tmp / "sample", tmp / "media", (args.modality,), limit=records)
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")  # the crawl runs on Ray
        try:
            config = bench.crawled_run(folder, tmp / "run", shard_size=bench.SHARD_SIZE)
        finally:
            ray.shutdown()
        spec = actor_spec(args.clip, tmp, batch, gpu)
        batches = actor_batches(spec, tmp / "run", config, batch, gpu)
        if not gpu:
            torch.set_num_threads(1)  # as the actor (limit_threads): its parts are timed in this process
        result = {"clip": args.clip, "modality": args.modality, **breakdown(spec, batches, gpu)}
        result["processes_rps"] = processes_rate(spec, batches, gpu, counts, tmp, args.seconds) if counts else {}
        if args.profile > 0:
            result["profile"] = profiled(spec, batches, gpu, args.profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _print(r: dict[str, Any]) -> None:
    ms = r["ms_per_batch"]
    print(f"\nCLIP actor ({r['clip']}, {r['modality']}, {r['device']}), {r['records']} records in batches of "
          f"{r['batch']}: ms a batch, and share of the call")  # fmt: skip
    for name, v in ms.items():
        print(f"  {name:<14} {v:9.2f}  {v / ms['call']:6.2f}")
    print(f"  call {r['call_rps']:,.1f} records/s against the bare forward's {r['bare_rps']:,.1f} "
          f"(call / bare {r['ratio']:.2f})")  # fmt: skip
    if r["processes_rps"]:
        print("  processes running the call at once, summed records/s: "
              + ", ".join(f"{k}: {v:,.1f}" for k, v in r["processes_rps"].items()))  # fmt: skip
    if "profile" in r:
        p = r["profile"]
        print(f"\nprofile of one pass of the call ({p['batches']} batches, {p['wall_ms']:.1f} ms under the profiler)")
        if p["device_busy_ms"] is not None:
            print(f"  device busy {p['device_busy_ms']:.1f} ms ({p['device_busy_ms'] / p['wall_ms']:.0%} of the pass)")
        print(p["table"])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
