"""Training as a library: one loop (`fit`) for pretraining and fine-tuning, typed settings,
the shared `--set` parser and the shipped presets.

    from funnel_jax.training import load_pretrain_config, pretrain
    summary = pretrain(load_pretrain_config("tiny", ["train.steps=40"]), "runs/tiny")
"""

from funnel_jax.training.config import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneLoopConfig,
    FinetuneModelConfig,
    LoopConfig,
    PretrainConfig,
    PretrainDataConfig,
    config_diff,
    restart_field,
    restart_may_change,
)
from funnel_jax.training.files import ConfigError
from funnel_jax.training.finetuning import finetune, load_finetune_config
from funnel_jax.training.loop import Hook, Loop, LoopContext, fit, mesh_context
from funnel_jax.training.overrides import apply_overrides, parse_override
from funnel_jax.training.presets import preset_names, preset_path
from funnel_jax.training.pretraining import load_pretrain_config, pretrain

__all__ = [
    "ConfigError",
    "FinetuneConfig",
    "FinetuneDataConfig",
    "FinetuneLoopConfig",
    "FinetuneModelConfig",
    "finetune",
    "load_finetune_config",
    "Hook",
    "Loop",
    "LoopConfig",
    "LoopContext",
    "PretrainConfig",
    "PretrainDataConfig",
    "apply_overrides",
    "config_diff",
    "fit",
    "load_pretrain_config",
    "mesh_context",
    "parse_override",
    "preset_names",
    "preset_path",
    "pretrain",
    "restart_field",
    "restart_may_change",
]
