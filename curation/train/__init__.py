"""The built-in trainer (nanoGPT-small): ``args`` (dataclasses), ``model``, ``data``, ``loop``, one file each.

Only the arguments are imported here; torch and Ray load when a run starts."""

from curation.train.args import ModelArgs, ModelSpec, StageArgs, TrainConfig

__all__ = ["ModelArgs", "ModelSpec", "StageArgs", "TrainConfig"]
