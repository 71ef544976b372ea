"""Image-text models through open_clip: by architecture name and pretrained tag, by a local checkpoint file, by a
local model folder (``local-dir:``), or the embedded bootstrap model (``curation-tiny-clip``, a custom open_clip
model config that this package registers by folder scan, as open_clip does with its own)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_CLIP = "curation-tiny-clip"
CHECKPOINT = "open_clip_model.safetensors"
FOLDER_CONFIG = "open_clip_config.json"
_registered = False


def register_model_configs() -> None:
    """Make open_clip find our model configs (``curation/models/configs/*.json``) by name; idempotent."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


@dataclass
class ClipSource:
    """What open_clip is asked to load: a model name (maybe ``local-dir:``), a pretrained tag or file, and
    preprocessing overrides."""

    model_name: str
    pretrained: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)


def resolve_clip(spec: Any) -> ClipSource:
    """Turn a ``ScoreConfig.Model`` into what open_clip loads; trains the bootstrap model on first use."""
    if spec.name == "bootstrap" and not spec.path and not spec.pretrained:
        from curation.models.bootstrap import ensure

        folder = ensure("clip")
        preprocess = json.loads((folder / FOLDER_CONFIG).read_text()).get("preprocess_cfg", {})
        return ClipSource(TINY_CLIP, str(folder / CHECKPOINT), preprocess)
    if spec.path:
        path = Path(spec.path).expanduser()
        if path.is_dir():
            if not (path / FOLDER_CONFIG).is_file():
                raise FileNotFoundError(f"{path}: no {FOLDER_CONFIG}; an open_clip model folder needs one")
            return ClipSource(f"local-dir:{path}")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file or model folder")
        if spec.name == "bootstrap":
            raise ValueError(f"{path}: a checkpoint file needs its architecture in `name` (e.g. ViT-B-32)")
        return ClipSource(spec.name, str(path))
    if spec.name.startswith(("local-dir:", "hf-hub:")):
        return ClipSource(spec.name)
    if not spec.pretrained:
        raise ValueError(f"open_clip model {spec.name!r} has no weights: set `pretrained` (a tag or file) or `path`")
    return ClipSource(spec.name, spec.pretrained)


def clip_preprocess_cfg(source: ClipSource) -> dict[str, Any]:
    """The image preprocessing (size, mean, std, resize mode, ...) of a model, read from its configs without
    loading weights, so decode tasks can run apart from the model actors."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_model_configs()
    cfg = PreprocessCfg().__dict__.copy()
    name = source.model_name
    if name.startswith("local-dir:"):
        folder_cfg = json.loads((Path(name[len("local-dir:") :]) / FOLDER_CONFIG).read_text())
        model_cfg = folder_cfg["model_cfg"]
        cfg = merge_preprocess_dict(cfg, folder_cfg.get("preprocess_cfg", {}))
    elif name.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        hf_cfg = _get_hf_config(name[len("hf-hub:") :])
        model_cfg = hf_cfg["model_cfg"]
        cfg = merge_preprocess_dict(cfg, hf_cfg.get("preprocess_cfg", {}))
    else:
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config {name!r}")
        tag_cfg = open_clip.get_pretrained_cfg(name, source.pretrained) if source.pretrained else None
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size:
        cfg["size"] = size
    return merge_preprocess_dict(cfg, source.preprocess)


def input_dtype(precision: str):
    """The dtype of the pixels an open_clip model loaded at ``precision`` takes. Not its first parameter's: at
    fp16/bf16 open_clip casts the matrix weights only, and the class and position embeddings stay fp32."""
    import open_clip
    import torch

    return open_clip.get_input_dtype(precision) or torch.float32


def load_clip(spec: Any, device: str = "cpu", precision: str = "fp32"):
    """Load an open_clip model with safe loaders (safetensors, or ``torch.load(weights_only=True)``).

    Returns ``(model, tokenizer, preprocess_cfg)``; the model is in eval mode on ``device``."""
    import open_clip

    register_model_configs()
    source = resolve_clip(spec)
    model = open_clip.create_model(
        source.model_name,
        pretrained=source.pretrained,
        device=device,
        precision=precision,
        weights_only=True,
        require_pretrained=True,
        force_preprocess_cfg=source.preprocess or None,
    )
    model.eval()
    return model, load_clip_tokenizer(spec), dict(model.visual.preprocess_cfg)


def load_clip_tokenizer(spec: Any):
    """The text tokenizer of the open_clip model ``spec``, without its weights."""
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(resolve_clip(spec).model_name)
