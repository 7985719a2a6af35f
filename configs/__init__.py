"""Presets shipped with funnel-jax as package data: pretrain/*.json, finetune/*.json and
models/*.json, found through importlib.resources (funnel_jax.training.presets)."""
