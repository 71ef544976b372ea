"""Factories for the trainer's tests: tiny settings."""

from __future__ import annotations


def train_settings(steps: int = 4, **overrides) -> dict:
    """A few tiny steps: 2 workers x micro-batch 4 = global batch 8, one micro-batch per worker per step."""
    stage = {"global_batch_size": 8, "micro_batch_size": 4, "max_steps": steps, "epochs": 100.0, "checkpoint_every": 2}
    cfg = {"num_workers": 2, "data_workers": 1, "seed": 0,
           "pretrain": {**stage, "lr": 3e-3},
           "instruct": {**stage, "lr": 1e-3, "llm": "lora", "lora_r": 8, "lora_alpha": 16}}  # fmt: skip
    cfg.update(overrides)
    return cfg
