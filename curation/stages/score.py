"""Score: give every crawled pair the signals that decide whether it is worth training on.

One Ray Data pipeline over the crawl shards, streaming:

    shards -> index (tar offsets of the kept records)
           -> decode (tasks: images and video frames through the image model's preprocessing, audio to CLAP
              log-mels, with GPUs to samples whose log-mels the CLAP actor makes on its GPU; a record the crawl
              accepted but that cannot be decoded is marked ``undecodable``; the perplexity LM's token ids and
              fastText's input lines, and with GPUs the CLIP tokens, so that preparing text is not the actors'
              work)
           -> ClipSimilarityScorer (actors: image and video rows) -> ClapSimilarityScorer (actors: audio rows)
           -> PerplexityScorer (actors) -> LanguageIdScorer (actors) -> text quality (tasks)
           -> driver: per shard, once all its records are back, write
                  score/ledger/<shard>.parquet      every record: kept with its scores, or rejected (undecodable)
                  score/embeddings/<shard>.parquet  uid, modality, embedding (list<float32>, L2-normalised)
                  score/done/<shard>.json           the shard is complete (resume skips it)

Scores are computed once (DataJuicer's stats-then-filter split): the score stage rejects nothing for quality and
the filter stage decides from the stored columns, so a new threshold never recomputes a score. Without GPUs every
actor reserves a fraction of a CPU (``score.<model>.num_cpus``) so all pools and the decode tasks fit on two cores
at once. With GPUs each model pool runs two actors a GPU in fp16, each with a GPU share and a whole core (its CPU
work paces the GPU), the decode tasks take a whole core each, and the light steps run several tasks at once.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import ScoreConfig
from curation.fsutil import atomic_path
from curation.ledger import LedgerError, write_part
from curation.stages.base import Stage, log

MEDIA_SCORERS = {"image_text": ("image",), "video_text": ("video",), "audio_text": ("audio",)}
EMBEDDINGS_SCHEMA = pa.schema([("uid", pa.string()), ("modality", pa.string()), ("embedding", pa.list_(pa.float32()))])
RECORD_COLUMNS = ("uid", "shard", "modality", "caption", "num_frames")


def index_shard(batch: pa.Table, crawl_dir: str, media: bool = True) -> pa.Table:
    """Ray Data batch function (a block: one row per crawl shard): the shards' kept records, with the tar offset and
    size of their media when ``media`` (a run that scores no media reads no tar)."""
    import pyarrow.compute as pc

    from curation.fsutil import tar_index

    out = []
    for shard, uids in zip(batch.column("shard").to_pylist(), batch.column("uids").to_pylist()):
        records = pq.read_table(Path(crawl_dir) / "shards" / f"{shard}.parquet", columns=list(RECORD_COLUMNS))
        records = records.filter(pc.is_in(records.column("uid"), value_set=pa.array(uids, pa.string())))
        n = records.num_rows
        extra = {"clip_score": pa.nulls(n, pa.float64()), "embedding": pa.nulls(n, pa.list_(pa.float32()))}
        if media:
            tar = Path(crawl_dir) / "shards" / f"{shard}.tar"
            members = tar_index(tar)
            offsets: dict[str, tuple[int, int]] = {}
            for name, where in members.items():
                key, _, ext = name.partition(".")
                if ext not in ("txt", "json"):
                    offsets[key] = where
            kept = records.column("uid").to_pylist()
            missing = [u for u in kept if u not in offsets]
            if missing:
                raise RuntimeError(f"{tar}: no media for {len(missing)} records the crawl kept (e.g. {missing[0]})")
            where = [offsets[u] for u in kept]
            extra = {"tar": pa.array([str(tar)] * n, pa.string()),
                     "offset": pa.array([w[0] for w in where], pa.int64()),
                     "size": pa.array([w[1] for w in where], pa.int64()), **extra}  # fmt: skip
        for name, values in extra.items():
            records = records.append_column(name, values)
        out.append(records)
    return pa.concat_tables(out).combine_chunks()  # one chunk a column: Ray serializes a block chunk by chunk


def without_media(batch: pa.Table) -> pa.Table:
    """Ray Data batch function for runs that score no media: the column media decoding would add."""
    return batch.append_column("undecodable", pa.nulls(batch.num_rows, pa.string()))


TEXT_BLOCK_RECORDS = 131_072  # records a block holds at most in runs that score only text
MIN_TEXT_BLOCKS = 8  # blocks a text-only run has at least, where it has that many shards
SMALL_TASK_CPUS = 0.1  # reading shard indexes and text statistics: light work that must never wait for a core
# two actors of each model pool per GPU: while one does its CPU work for a batch (reading the inputs, tokenizing
# the captions, copying to the GPU), the other's forward runs; with one, the GPU sat idle for most of each call
GPU_ACTORS_PER_GPU = 2
GPU_MODEL_POOLS = 3  # CLIP, CLAP and the LM: the default GPU shares let all of them fit each GPU at once
CPU_ACTOR_CPUS, GPU_ACTOR_CPUS = 0.25, 1.0  # a model actor's default reservation without and with a GPU share
CPU_DECODE_CPUS, GPU_DECODE_CPUS = 0.5, 1.0  # a decode task's, on a cluster without and with GPUs
CPUS_PER_SMALL_TASK = 4  # one task in flight per light step for every 4 cluster CPUs (one on the 2-core machines)


def small_tasks(cluster_cpus: float) -> int:
    """Tasks in flight for each light step (shard indexes, text statistics): one on a small machine, where each
    concurrent task would start (and import into) one more worker process; more on a large one, where a single
    index task at a time (about a tenth of a second a shard) would starve the decode tasks of every other core."""
    return max(1, int(cluster_cpus // CPUS_PER_SMALL_TASK))


def _fit_cpus(pools: list[dict[str, Any]], decode: float, cluster_cpus: float) -> float:
    """Scale the actors' CPU reservations (in place) and the decode tasks' so that every pool, one decode task and
    the small tasks fit the cluster at once: otherwise actors holding every CPU would wait forever for decoded
    batches no task can be scheduled to make. Returns the decode tasks' CPUs."""
    small = 2 * SMALL_TASK_CPUS * small_tasks(cluster_cpus)
    need = sum(k["num_cpus"] * k["concurrency"] for k in pools) + decode + small
    room = cluster_cpus - small
    if need - small <= room:
        return decode
    factor = room / (need - small)
    log.warning("score: the scorers ask for %.2f CPUs but the cluster has %s; scaling their reservations by %.2f",
                need, cluster_cpus, factor)  # fmt: skip
    for k in pools:
        k["num_cpus"] *= factor
    return decode * factor


def _num_blocks(items: list[dict[str, Any]], media: bool) -> int:
    """How many blocks the shards are read in; a block is the unit of every task and actor call.

    One shard each when there is media to decode (decoding spreads over the blocks). Several when there is only
    text: handing a block between Ray Data operators cost the language-id actor 8% of its time at 32,768 captions
    a block and 2% at 131,072, so blocks hold up to ``TEXT_BLOCK_RECORDS`` records; but a run has at least
    ``MIN_TEXT_BLOCKS`` blocks where it has the shards, so that its steps still overlap."""
    if media:
        return len(items)
    records = sum(len(i["uids"]) for i in items)
    return min(len(items), max(MIN_TEXT_BLOCKS, -(-records // TEXT_BLOCK_RECORDS)))


def _resizes_as_pillow() -> bool:
    """Whether the actors can resize images to the installed Pillow's pixels (else the decode tasks resize them)."""
    import PIL

    from curation.scoring.resample import matches_pil

    if matches_pil():
        return True
    log.warning("score: Pillow %s resizes differently from curation.scoring.resample; the decode tasks resize "
                "images and video frames, not the GPU actors", PIL.__version__)  # fmt: skip
    return False


def _pool_kwargs(spec: ScoreConfig.Model, gpus: float, uses_gpu: bool = True, text: bool = False) -> dict[str, Any]:
    """Ray Data actor-pool arguments for one model: fractional CPUs always, a GPU share when the cluster has GPUs.
    A text scorer's actor takes whole blocks (whole shards) a call and splits them into model batches of
    ``spec.batch_size`` itself: Ray Data's slicing and merging cost about a microsecond a record at 512-record
    calls, a fifth of a fastText prediction, and a call never holds part of a shard. On a GPU, where Ray Data
    requires a batch size, it takes ``spec.batch_size`` rows a call like the media scorers (the slicing is small
    next to a GPU forward, and fp16 scores are reproducible up to rounding only anyway)."""
    on_gpu = uses_gpu and gpus > 0 and spec.device != "cpu"
    share = 1 / (GPU_MODEL_POOLS * GPU_ACTORS_PER_GPU)
    num_gpus = (spec.num_gpus if spec.num_gpus is not None else share) if on_gpu else 0
    concurrency = spec.concurrency or (GPU_ACTORS_PER_GPU * max(1, int(gpus)) if on_gpu else 1)
    batch = None if text and not num_gpus else spec.batch_size
    cpus = spec.num_cpus if spec.num_cpus is not None else GPU_ACTOR_CPUS if num_gpus else CPU_ACTOR_CPUS
    kwargs: dict[str, Any] = {"concurrency": concurrency, "num_cpus": cpus, "batch_size": batch}
    if num_gpus:
        kwargs["num_gpus"] = num_gpus
    return kwargs


def decode_cpus(cfg: ScoreConfig, gpus: float) -> float:
    """CPUs a decode task reserves: ``score.decode_num_cpus``, by default half a core without GPUs (two-core
    machines) and a whole one with GPUs. On a 16-core GPU machine, half a core each let 30 decode processes take
    every core, and the GPU actors, whose CPU work paces the GPU, got half a core each."""
    if cfg.decode_num_cpus is not None:
        return cfg.decode_num_cpus
    return GPU_DECODE_CPUS if gpus > 0 else CPU_DECODE_CPUS


def _map_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``map_batches`` arguments for an actor pool described by :func:`_pool_kwargs`."""
    import ray

    args = {k: v for k, v in kwargs.items() if k != "concurrency"}
    return {**args, "compute": ray.data.ActorPoolStrategy(size=kwargs["concurrency"])}


class ScoreStage(Stage):
    """Media-text similarity (CLIP/CLAP), caption perplexity, language id and text-quality statistics."""

    name = "score"
    order = 20
    config_sections = ("score",)
    help = "score every pair: CLIP/CLAP similarity, caption perplexity, language id, text quality (nothing filtered)"

    def embeddings_path(self, shard: str) -> Path:
        return self.dir / "embeddings" / f"{shard}.parquet"

    def run(self, input_stage: str = "crawl") -> dict[str, Any]:
        cfg = self.config.score
        records = self.kept_records(columns=["modality"])  # the tasks read the rest from the shards
        pending = {s: t for s, t in records.items() if not self.is_shard_done(s)}
        log.info("score: %d shards, %d already complete", len(records), len(records) - len(pending))
        if pending:
            self._score(cfg, pending)
        totals: Counter = Counter()
        reasons: Counter = Counter()
        for shard in records:
            s = json.loads(self.done_path(shard).read_text())
            totals.update({k: s[k] for k in ("input", "kept", "rejected")})
            reasons.update(s["reasons"])
        return {**{k: totals[k] for k in ("input", "kept", "rejected")}, "shards": len(records),
                "reasons": dict(sorted(reasons.items())), "scorers": list(cfg.scorers)}  # fmt: skip

    # -- the pipeline --------------------------------------------------------------------------------------------
    def _score(self, cfg: ScoreConfig, pending: dict[str, pa.Table]) -> None:
        import pyarrow.compute as pc

        started = time.time()
        for shard in [s for s, t in pending.items() if t.num_rows == 0]:  # nothing left to score in it
            self._write_shard(shard, pending.pop(shard), pa.table({"uid": pa.array([], pa.string())}), cfg, started)
        if not pending:
            return
        ds = self.dataset(cfg, pending)
        expected = {s: t.num_rows for s, t in pending.items()}
        parts: dict[str, list[pa.Table]] = defaultdict(list)
        got: Counter = Counter()
        # shards finish in any order; each is written as soon as all its records are back, so memory holds only
        # the shards in flight, however large the run
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for shard in set(batch.column("shard").to_pylist()):
                part = batch.filter(pc.equal(batch.column("shard"), shard))
                parts[shard].append(part)
                got[shard] += part.num_rows
                if got[shard] == expected[shard]:
                    self._write_shard(shard, pending[shard], pa.concat_tables(parts.pop(shard)), cfg, started)

    def dataset(self, cfg: ScoreConfig, pending: dict[str, pa.Table]):
        """The Ray Data pipeline that scores the records of ``pending`` (crawl shard -> records), lazily; each
        output row is a record with its scores (and ``embedding``, ``undecodable``)."""
        import ray

        from curation.scoring.clip_similarity import add_clip_tokens
        from curation.scoring.decode import decode_batch
        from curation.scoring.language import add_lid_lines
        from curation.scoring.perplexity import add_lm_ids
        from curation.scoring.text_quality import text_quality_batch

        present = {m for t in pending.values() for m in t.column("modality").to_pylist()}
        media = [s for s in cfg.scorers if s in MEDIA_SCORERS and present & set(MEDIA_SCORERS[s])]
        plan, pools = self._plan(cfg, media)
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        stages: list[tuple[type, dict[str, Any], dict[str, Any]]] = []  # (scorer class, constructor, pool args)
        for i, (scorer_cls, spec) in enumerate(pools):
            kwargs = _pool_kwargs(spec, gpus)
            ctor = {"spec": spec, "has_gpu": "num_gpus" in kwargs, "drop_inputs": i == len(pools) - 1}
            stages.append((scorer_cls, ctor, kwargs))
        if "perplexity" in cfg.scorers:
            from curation.scoring.perplexity import PerplexityScorer

            kwargs = _pool_kwargs(cfg.perplexity, gpus, text=True)
            stages.append((PerplexityScorer, {"spec": cfg.perplexity, "has_gpu": "num_gpus" in kwargs}, kwargs))
        if "language" in cfg.scorers:
            from curation.scoring.language import LanguageIdScorer

            kwargs = _pool_kwargs(cfg.language, gpus, uses_gpu=False, text=True)
            stages.append((LanguageIdScorer, {"spec": cfg.language}, kwargs))
        decode = _fit_cpus([k for _, _, k in stages], decode_cpus(cfg, gpus), resources.get("CPU", 1))
        # with GPUs, the CLAP log-mels and the images' and frames' resizes move from the decode tasks' cores to the
        # actors' GPUs, and the CLIP tokens from the actors' cores (which pace their GPUs) to the tasks
        on_gpu = {cls.name for cls, _, kw in stages if "num_gpus" in kw}
        plan.audio_waves = "audio_text" in on_gpu
        plan.pixels_as_decoded = cfg.resize_on_gpu and "image_text" in on_gpu and _resizes_as_pillow()
        used = {"image_text": "image_text" in media or "video_text" in media, "audio_text": "audio_text" in media,
                "perplexity": "perplexity" in cfg.scorers, "language": "language" in cfg.scorers}  # fmt: skip
        log.info("score: models: %s", ", ".join(f"{k}={_describe(getattr(cfg, k))}" for k, on in used.items() if on)
                 or "none")  # fmt: skip

        items = [{"shard": s, "uids": t.column("uid").to_pylist()} for s, t in sorted(pending.items())]
        ds = ray.data.from_items(items, override_num_blocks=_num_blocks(items, media=bool(pools)))
        tasks = small_tasks(resources.get("CPU", 1))
        small = {"num_cpus": SMALL_TASK_CPUS, "compute": ray.data.TaskPoolStrategy(size=tasks)}
        crawl_dir = str(self.ctx.run_dir / "crawl")
        ds = ds.map_batches(index_shard, fn_kwargs={"crawl_dir": crawl_dir, "media": bool(pools)}, batch_size=None,
                            batch_format="pyarrow", **small)  # fmt: skip
        if pools:
            ds = ds.map_batches(decode_batch, fn_kwargs={"plan": plan}, batch_size=cfg.decode_batch_size,
                                batch_format="pyarrow", num_cpus=decode)  # fmt: skip
        else:
            ds = ds.map_batches(without_media, batch_format="pyarrow", **small)
        # the text models' inputs (the LM's token ids, fastText's lines), made where decoding is, not on the
        # actors' cores
        step = {"batch_size": cfg.decode_batch_size, "num_cpus": decode} if pools else small
        tokens = self._lm_tokens(cfg)
        if tokens is not None:
            ds = ds.map_batches(add_lm_ids, fn_kwargs={"tokens": tokens}, batch_format="pyarrow", **step)
        if "language" in cfg.scorers:
            ds = ds.map_batches(add_lid_lines, batch_format="pyarrow", **step)
        if "image_text" in on_gpu:  # see add_clip_tokens
            ds = ds.map_batches(add_clip_tokens, fn_kwargs={"spec": cfg.image_text}, batch_format="pyarrow", **step)
        for scorer_cls, ctor, kwargs in stages:
            ds = ds.map_batches(scorer_cls, fn_constructor_kwargs=ctor, batch_format="pyarrow", **_map_args(kwargs))
        if "text_quality" in cfg.scorers:
            ds = ds.map_batches(text_quality_batch, batch_format="pyarrow", batch_size=256, **small)
        return ds

    @staticmethod
    def _lm_tokens(cfg: ScoreConfig):
        """The perplexity model's tokenizer for the tasks, or ``None`` (no perplexity, or a tokenizer without a
        Rust backend: then the actor tokenizes)."""
        if "perplexity" not in cfg.scorers:
            return None
        from curation.scoring.perplexity import LmTokens

        return LmTokens.for_model(cfg.perplexity)

    def _plan(self, cfg: ScoreConfig, media: list[str]):
        """The decode plan and the media scorer pools. Bootstrap models are trained here, on the driver, before
        any actor starts (several actors must never race to train the same model)."""
        from curation.models.bootstrap import KINDS, bootstrap
        from curation.scoring.decode import DecodePlan

        needed = []
        if ("image_text" in media or "video_text" in media) and _is_bootstrap(cfg.image_text):
            needed.append("clip")
        if "audio_text" in media and _is_bootstrap(cfg.audio_text):
            needed.append("clap")
        if "perplexity" in cfg.scorers and _is_bootstrap(cfg.perplexity):
            needed.append("lm")
        if needed:
            bootstrap([k for k in KINDS if k in needed])
        plan = DecodePlan(video_frames=cfg.video_frames)
        pools: list[tuple[type, ScoreConfig.Model]] = []
        if "image_text" in media or "video_text" in media:
            from curation.models.clip import clip_preprocess_cfg, resolve_clip
            from curation.scoring.clip_similarity import ClipSimilarityScorer

            preprocess = clip_preprocess_cfg(resolve_clip(cfg.image_text))
            plan.image = preprocess if "image_text" in media else None
            plan.video = preprocess if "video_text" in media else None
            pools.append((ClipSimilarityScorer, cfg.image_text))
        if "audio_text" in media:
            from curation.models.hf import load_clap_feature_extractor
            from curation.scoring.clap_similarity import ClapSimilarityScorer
            from curation.scoring.decode import AudioFeatures

            plan.audio = AudioFeatures.of(load_clap_feature_extractor(cfg.audio_text))
            pools.append((ClapSimilarityScorer, cfg.audio_text))
        return plan, pools

    # -- outputs -------------------------------------------------------------------------------------------------
    def _write_shard(self, shard: str, records: pa.Table, scored: pa.Table, cfg: ScoreConfig, started: float) -> None:
        """The shard's ledger part (every record, its scores, undecodable media rejected) and its embeddings,
        built column-wise: the driver does this for every record of the run, so no per-record Python."""
        import pyarrow.compute as pc

        from curation.scoring import score_schema

        n = records.num_rows
        uids = records.column("uid")
        order = pc.index_in(uids, value_set=scored.column("uid").combine_chunks())
        if order.null_count:
            raise LedgerError(f"score: shard {shard}: {order.null_count} records did not come back from scoring")
        scored = scored.take(order)  # the shard's record order: batches come back in any order

        def column(name: str, type_: pa.DataType) -> pa.ChunkedArray | pa.Array:
            return scored.column(name).cast(type_) if name in scored.column_names else pa.nulls(n, type_)

        undecodable = column("undecodable", pa.string())
        bad = pc.is_valid(undecodable)
        rejected = pc.sum(bad).as_py() or 0
        part = {"uid": uids, "status": pc.if_else(bad, "rejected", "kept"), "stage": pa.array([self.name] * n),
                "reason": pc.if_else(bad, "undecodable", pa.scalar(None, pa.string())), "detail": undecodable,
                "dup_of": pa.nulls(n, pa.string())}  # fmt: skip
        schema = score_schema(cfg.scorers)
        part.update({f.name: column(f.name, f.type) for f in schema})
        write_part(self.ledger_path(shard), pa.table(part), extra_schema=schema)
        embeddings = 0
        if cfg.embeddings:
            emb = column("embedding", EMBEDDINGS_SCHEMA.field("embedding").type)
            table = pa.table({"uid": uids, "modality": records.column("modality"), "embedding": emb})
            table = table.filter(pc.and_(pc.invert(bad), pc.is_valid(emb))).cast(EMBEDDINGS_SCHEMA)
            embeddings = table.num_rows
            with atomic_path(self.embeddings_path(shard)) as tmp:
                pq.write_table(table, tmp)
        reasons = {"undecodable": rejected} if rejected else {}
        self.mark_shard_done(shard, {"input": n, "kept": n - rejected, "rejected": rejected, "reasons": reasons,
                                     "embeddings": embeddings})  # fmt: skip
        log.info("score: shard %s done: %d records, %d undecodable (%.1f s since start)", shard, n, rejected,
                 time.time() - started)  # fmt: skip


def _describe(spec: ScoreConfig.Model) -> str:
    """Where a model comes from, for the log: its path, name and pretrained tag, or the embedded bootstrap."""
    if _is_bootstrap(spec):
        return "bootstrap (embedded tiny model)"
    return spec.path or (f"{spec.name} ({spec.pretrained})" if spec.pretrained else spec.name)


def _is_bootstrap(spec: ScoreConfig.Model) -> bool:
    return spec.name == "bootstrap" and not spec.path and not spec.pretrained
