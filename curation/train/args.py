"""The trainer's arguments: one dataclass per concern, as litgpt's ``TrainArgs``/``EvalArgs``.

``TrainConfig`` is the ``train:`` section of a pipeline recipe. Its ``pretrain`` and ``instruct`` sub-configs
default to LLaVA-1.5's two stages: projector pre-training (lr 1e-3, global batch 256) and instruction tuning
(lr 2e-5, global batch 128), cosine schedule with 3% warmup, one epoch each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROJECTORS = ("mlp2x_gelu", "linear")
VIDEO_POOLS = ("mean", "max")
LLM_MODES = ("frozen", "full", "lora")
TEMPLATES = ("plain", "vicuna_v1")
TRAIN_STAGES = ("pretrain", "instruct")


@dataclass
class ModelSpec:
    """A model the trainer loads (same meaning as ``score.*`` models).

    Args:
        name: ``bootstrap`` (the embedded tiny model), an open_clip architecture for ``vision``, or a transformers
            model id (read from the local cache only) for ``audio`` and ``llm``.
        pretrained: open_clip only: a pretrained tag or checkpoint file.
        path: a local checkpoint file or model folder.
    """

    name: str = "bootstrap"
    pretrained: str | None = None
    path: str | None = None

    def validate(self) -> list[str]:
        return [] if self.name else ["name: required (bootstrap, or a model name)"]


@dataclass
class ModelArgs:
    """The multimodal model: frozen towers, one projector per modality, a causal LM.

    Args:
        vision: the open_clip model whose image tower encodes images and video frames (frozen).
        audio: the CLAP model whose audio tower encodes audio (frozen).
        llm: the causal LM.
        projector: ``mlp2x_gelu`` (LLaVA-1.5) or ``linear`` (LLaVA-1).
        media_tokens: LM positions one media item takes: the tower's token grid is average-pooled to this many;
            ``null`` keeps every patch token (LLaVA; needs an LM with a long context).
        video_frames: frames sampled uniformly from a video; their tokens are pooled over time with ``video_pool``.
        video_pool: ``mean`` or ``max`` over frames.
        max_length: tokens per sample after media expansion (cut to the LM's context when that is shorter).
    """

    vision: ModelSpec = field(default_factory=ModelSpec)
    audio: ModelSpec = field(default_factory=ModelSpec)
    llm: ModelSpec = field(default_factory=ModelSpec)
    projector: str = "mlp2x_gelu"
    media_tokens: int | None = 4
    video_frames: int = 4
    video_pool: str = "mean"
    max_length: int = 2048

    def validate(self) -> list[str]:
        problems = []
        if self.projector not in PROJECTORS:
            problems.append(f"projector: {self.projector!r} is not one of {', '.join(PROJECTORS)}")
        if self.video_pool not in VIDEO_POOLS:
            problems.append(f"video_pool: {self.video_pool!r} is not one of {', '.join(VIDEO_POOLS)}")
        if self.media_tokens is not None and self.media_tokens < 1:
            problems.append(f"media_tokens: must be >= 1 or null, got {self.media_tokens}")
        for name in ("video_frames", "max_length"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        return problems


@dataclass
class StageArgs:
    """One training stage.

    Args:
        enabled: run this stage.
        llm: ``frozen`` (only the projectors train: stage 1), ``full`` or ``lora`` (through peft).
        template: chat template: ``plain`` (media token + caption, stage 1) or ``vicuna_v1`` (stage 2).
        lr / weight_decay / warmup_ratio: AdamW with linear warmup, then cosine decay to 0.
        global_batch_size: samples per optimizer step over all workers; reached by gradient accumulation of
            ``micro_batch_size`` samples per worker; must be a multiple of ``micro_batch_size * num_workers``.
        epochs: passes over the data (fractional is fine); ``max_steps`` caps the optimizer steps.
        checkpoint_every: optimizer steps between checkpoints (one is always written at the end).
        lora_r / lora_alpha / lora_dropout: LoRA settings (LLaVA-1.5: r 128, alpha 256).
    """

    enabled: bool = True
    llm: str = "frozen"
    template: str = "plain"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    global_batch_size: int = 256
    micro_batch_size: int = 16
    epochs: float = 1.0
    max_steps: int | None = None
    checkpoint_every: int = 500
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05

    def validate(self) -> list[str]:
        problems = []
        if self.llm not in LLM_MODES:
            problems.append(f"llm: {self.llm!r} is not one of {', '.join(LLM_MODES)}")
        if self.template not in TEMPLATES:
            problems.append(f"template: {self.template!r} is not one of {', '.join(TEMPLATES)}")
        for name in ("global_batch_size", "micro_batch_size", "checkpoint_every", "lora_r", "lora_alpha"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.epochs <= 0:
            problems.append(f"lr and epochs: must be > 0, got {self.lr} and {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps: must be >= 1 or null, got {self.max_steps}")
        return problems


@dataclass
class InstructArgs(StageArgs):
    """Stage 2 (instruction tuning): :class:`StageArgs` with LLaVA-1.5's stage-2 defaults (a class of its own so
    that a recipe setting one key of ``instruct:`` keeps the other stage-2 defaults)."""

    llm: str = "full"
    template: str = "vicuna_v1"
    lr: float = 2e-5
    global_batch_size: int = 128


@dataclass
class TrainConfig:
    """The ``train`` stage: stage 1 (``pretrain``) then stage 2 (``instruct``) on Ray Train.

    Args:
        release: the release folder to train on; ``null`` uses ``RUN_DIR/release`` (the release stage must run).
        num_workers: Ray Train workers (data-parallel replicas).
        num_cpus_per_worker: CPUs a worker reserves (keep num_workers x this within the cluster's CPUs).
        use_gpu: ``auto`` (one GPU a worker when the cluster has GPUs), ``true`` or ``false``.
        strategy: ``ddp`` or ``fsdp`` (shards the LLM for models that do not fit one device).
        precision: ``auto`` (bf16 on GPU, fp32 on CPU), ``bf16`` or ``fp32``.
        seed: model init, data order and dropout; the same seed gives the same run.
        data_workers: DataLoader processes per Ray Train worker that read and decode media, off the step's path.
        system_prompt: put before the first ``vicuna_v1`` turn; empty by default because the embedded tiny LM
            has a 64-token context (set LLaVA's prompt for a real LM).
        max_failures: times Ray Train restarts a failed worker group (each restart resumes from the last
            checkpoint).
    """

    release: str | None = None
    num_workers: int = 2
    num_cpus_per_worker: float = 1.0
    use_gpu: str | bool = "auto"
    strategy: str = "ddp"
    precision: str = "auto"
    seed: int = 0
    data_workers: int = 1
    system_prompt: str = ""
    max_failures: int = 0
    model: ModelArgs = field(default_factory=ModelArgs)
    pretrain: StageArgs = field(default_factory=StageArgs)
    instruct: InstructArgs = field(default_factory=InstructArgs)

    def validate(self) -> list[str]:
        problems = []
        if self.num_workers < 1:
            problems.append(f"num_workers: must be >= 1, got {self.num_workers}")
        if self.num_cpus_per_worker <= 0:
            problems.append(f"num_cpus_per_worker: must be > 0, got {self.num_cpus_per_worker}")
        if self.use_gpu not in ("auto", "true", "false", True, False):
            problems.append(f"use_gpu: {self.use_gpu!r} is not auto, true or false")
        if self.strategy not in ("ddp", "fsdp"):
            problems.append(f"strategy: {self.strategy!r} is not ddp or fsdp")
        if self.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"precision: {self.precision!r} is not auto, bf16 or fp32")
        if self.data_workers < 0 or self.max_failures < 0:
            problems.append("data_workers and max_failures: must be >= 0")
        for name in TRAIN_STAGES:
            stage: StageArgs = getattr(self, name)
            per_step = stage.micro_batch_size * self.num_workers
            if stage.global_batch_size % per_step:
                problems.append(
                    f"{name}.global_batch_size: {stage.global_batch_size} is not a multiple of micro_batch_size x "
                    f"num_workers ({stage.micro_batch_size} x {self.num_workers})"
                )
        return problems
