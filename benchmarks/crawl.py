"""Crawl throughput: the crawl stage vs img2dataset alone, on the same loopback URL list, in the same run.

    .venv/bin/python benchmarks/crawl.py [--images 2000] [--rounds 3] [--threads 32] [--processes 2]

Both sides get the same work and the same parallelism: ``--processes`` shard workers (img2dataset's
multiprocessing distributor; our Ray Data tasks) with ``--threads`` download threads each, over the same URL list
served by one server process on 127.0.0.1. img2dataset runs with ``resize_mode="no"`` and ``skip_reencode`` (it
decodes every image, keeps the original bytes, and computes sha256), which is the same work the crawl stage does
(download, full decode to probe, sha256, webdataset shards). Ray is started before the clock, as a cluster would
be, but restarted before every round so that our workers import their libraries inside the clock, as
img2dataset's freshly spawned processes do. Prints records/s for each side, the median over rounds, and the ratio (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parent.parent


def make_images(root: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n distinct small JPEG/PNG images (64-320 px, like web thumbnails) with captions."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    media = root / "media" / "image"
    media.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(64, 320, size=2))
        img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        draw.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        ext = "jpg" if i % 3 else "png"
        buf = io.BytesIO()
        img.save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=90)
        name = f"bench-{i:06d}.{ext}"
        (media / name).write_bytes(buf.getvalue())
        items.append((f"media/image/{name}", f"a coloured ellipse, image {i}"))
    return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "curation.sample.server", str(root), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the benchmark server did not start")


def run_img2dataset(url_list: Path, out: Path, n: int, processes: int, threads: int) -> float:
    import img2dataset

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    img2dataset.download(
        url_list=str(url_list),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        processes_count=processes,
        thread_count=threads,
        resize_mode="no",
        skip_reencode=True,
        compute_hash="sha256",
        number_sample_per_shard=-(-n // processes),
        distributor="multiprocessing",
        timeout=10,
        retries=0,
        enable_wandb=False,
    )
    return time.perf_counter() - t0


def run_ours(url_list: Path, out: Path, n: int, processes: int, threads: int) -> tuple[float, dict]:
    from curation.config import load_config
    from curation.runner import Run

    shutil.rmtree(out, ignore_errors=True)
    config = load_config(
        data={
            "name": "bench",
            "stages": ["crawl"],
            "input": {"path": str(url_list)},
            "crawl": {
                "shard_size": -(-n // processes),
                "parallelism": processes,
                "num_cpus": 1.0,
                "threads": threads,
                "retries": 0,
                # img2dataset has no per-host limit; one loopback host serves the whole list
                "per_host_concurrency": threads,
                "allow_private_addresses": True,
            },
        }
    )
    t0 = time.perf_counter()
    state = Run(config, out).run()
    return time.perf_counter() - t0, state["counts"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to put the images and outputs (default: a temp dir)")
    args = parser.parse_args()

    import logging

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-crawl-"))
    t0 = time.perf_counter()
    items = make_images(work / "site", args.images)
    print(f"generated {len(items)} images in {time.perf_counter() - t0:.1f} s under {work}")
    server, base = start_server(work / "site")
    try:
        url_list = work / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{base}/{p}" for p, _ in items], "caption": [c for _, c in items]}), url_list)
        ours, theirs = [], []
        for r in range(args.rounds):
            t_i2d = run_img2dataset(url_list, work / "i2d", args.images, args.processes, args.threads)
            # a fresh Ray instance per round: no worker process has img2dataset or PyAV imported yet
            if ray.is_initialized():
                ray.shutdown()
            ray.init(address="local", num_cpus=args.processes, include_dashboard=False, logging_level="WARNING")
            ray.data.DataContext.get_current().enable_progress_bars = False
            t_ours, counts = run_ours(url_list, work / "ours", args.images, args.processes, args.threads)
            if counts["kept"] != args.images:
                raise SystemExit(f"crawl kept {counts['kept']} of {args.images} images: {counts}")
            ok_i2d = sum(json.loads(p.read_text())["successes"] for p in (work / "i2d").glob("*_stats.json"))
            if ok_i2d != args.images:
                raise SystemExit(f"img2dataset downloaded {ok_i2d} of {args.images} images")
            theirs.append(args.images / t_i2d)
            ours.append(args.images / t_ours)
            print(
                f"round {r + 1}: img2dataset {theirs[-1]:8.1f} rec/s ({t_i2d:.2f} s)   "
                f"crawl stage {ours[-1]:8.1f} rec/s ({t_ours:.2f} s)   ratio {ours[-1] / theirs[-1]:.2f}"
            )
        m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
        print(
            f"\ncrawl throughput, {args.images} loopback images, {args.processes} workers x {args.threads} threads, "
            f"median of {args.rounds}:"
        )
        print(f"  img2dataset alone : {m_theirs:8.1f} records/s")
        print(f"  curation crawl    : {m_ours:8.1f} records/s")
        print(f"  ratio             : {m_ours / m_theirs:8.2f}   (target >= 0.90)")
    finally:
        server.terminate()
        server.wait()
        if ray.is_initialized():
            ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
