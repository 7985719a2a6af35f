"""The optimizer shared by pretraining and fine-tuning: AdamW as the original Funnel code uses it.

    opt_cfg = OptimizerConfig(learning_rate=1e-4, warmup_steps=10_000, total_steps=1_000_000)
    tx = make_optimizer(opt_cfg)              # an optax.GradientTransformation
    schedule = learning_rate_schedule(opt_cfg)

The chain is: global-norm clipping -> Adam moments (b1, b2, eps) -> decoupled weight decay
(skipped for layer-norm parameters and biases) -> optional layer-wise learning-rate scale ->
learning rate (linear warm-up from 0, then linear decay to `min_lr_ratio * learning_rate` at
`total_steps`). Gradient accumulation is done by the train step (funnel_jax/train_state.py),
which reads `grad_accum_steps` from here.

The schedule is driven by optax's own update count, i.e. by the number of updates actually
applied: a step skipped for non-finite gradients (train_state.py) does not advance it.

Differences from the original TF optimizer (tensorflow/optimization.py), on purpose:
- optax's Adam divides by `sqrt(v_hat) + eps` with bias-corrected moments; the original folds
  the bias correction into the learning rate (`lr * sqrt(1 - b2^t) / (1 - b1^t)`) and adds eps
  to the uncorrected `sqrt(v)`. They differ only through eps.
- The original's layer-wise decay multiplies the *gradients*, which Adam almost entirely
  normalises away; here it scales the *updates* (the learning rate), as ELECTRA does, so that
  it has the intended effect. Depths follow the original: embeddings are the deepest, the top
  layer and every head get scale 1.
- The attention biases r_w_bias / r_r_bias / r_s_bias are decayed like weights (the original
  lists them in `include_in_weight_decay`); only parameters named `bias` and layer-norm
  parameters are excluded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from funnel_jax.pytree import path_names

_LAYER_NORM_NAMES = ("layer_norm", "ln", "LayerNorm", "lm_layer_norm")
_BLOCK_RE = re.compile(r"^blocks_(\d+)_(\d+)$")
_DECODER_LAYER_RE = re.compile(r"^layers_(\d+)$")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + schedule + clipping + accumulation settings (JSON-friendly, frozen)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0: round(warmup_ratio * total_steps)
    total_steps: int | None = None  # end of the linear decay; None: give it to make_optimizer
    min_lr_ratio: float = 0.0  # the learning rate decays to min_lr_ratio * learning_rate
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-6
    clip_norm: float | None = 1.0  # global-norm clipping; None or 0 disables it
    grad_accum_steps: int = 1  # micro-batches per update (the train step splits the batch)
    layerwise_lr_decay: float = 1.0  # 1.0: off; e.g. 0.75 for SQuAD fine-tuning

    def __post_init__(self):
        def fail(name, msg):
            raise ValueError(f"OptimizerConfig.{name}: {msg} (got {getattr(self, name)!r})")

        if not self.learning_rate >= 0:
            fail("learning_rate", "must be >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            fail("warmup_steps", "must be an int >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            fail("warmup_ratio", "must be in [0, 1)")
        if self.total_steps is not None and (
            not isinstance(self.total_steps, int) or self.total_steps <= 0
        ):
            fail("total_steps", "must be a positive int or None")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", "must be in [0, 1]")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must be in [0, 1)")
        if self.eps < 0:
            fail("eps", "must be >= 0")
        if self.clip_norm is not None and self.clip_norm < 0:
            fail("clip_norm", "must be >= 0 or None")
        if not isinstance(self.grad_accum_steps, int) or self.grad_accum_steps < 1:
            fail("grad_accum_steps", "must be an int >= 1")
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            fail("layerwise_lr_decay", "must be in (0, 1]")

    def replace(self, **changes) -> OptimizerConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OptimizerConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in names and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unknown optimizer setting(s) {unknown}; expected {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolve_total_steps(self, total_steps: int | None = None) -> int:
        total = self.total_steps if total_steps is None else total_steps
        if total is None:
            raise ValueError(
                "the learning-rate schedule needs total_steps: set OptimizerConfig.total_steps "
                "or pass total_steps="
            )
        if total <= 0:
            raise ValueError(f"total_steps must be positive, got {total}")
        return int(total)

    def resolve_warmup_steps(self, total_steps: int | None = None) -> int:
        if self.warmup_steps > 0:
            return self.warmup_steps
        return int(round(self.warmup_ratio * self.resolve_total_steps(total_steps)))


def learning_rate_schedule(config: OptimizerConfig, total_steps: int | None = None):
    """Linear warm-up from 0 to the peak over the warm-up steps, then linear decay to
    `min_lr_ratio * peak` at total_steps (constant afterwards). count 0 is the first update."""
    total = config.resolve_total_steps(total_steps)
    warmup = config.resolve_warmup_steps(total)
    peak = float(config.learning_rate)
    end = peak * float(config.min_lr_ratio)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = peak * count / max(warmup, 1)
        frac = jnp.clip((count - warmup) / max(total - warmup, 1), 0.0, 1.0)
        decay = peak + (end - peak) * frac
        return jnp.where(count < warmup, warm, decay)

    return schedule


def is_decayed(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (tuple of names) gets weight decay: not for biases
    (a leaf named `bias`) nor for layer-norm parameters."""
    if not path:
        return True
    if path[-1] == "bias":
        return False
    return not any(name in _LAYER_NORM_NAMES for name in path[:-1])


def weight_decay_mask(params) -> Any:
    """Pytree of bools, True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_decayed(path_names(p)), params)


def layer_depths(params) -> Any:
    """Pytree of ints: 0 for the embeddings, 1.. for encoder layers in order, then decoder layers,
    and the top depth (one above the last layer) for everything else (heads)."""
    paths = [path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    encoder = sorted(
        {
            (int(m.group(1)), int(m.group(2)))
            for path in paths
            for m in (_BLOCK_RE.match(n) for n in path)
            if m
        }
    )
    decoder = sorted(
        {
            int(m.group(1))
            for path in paths
            if "decoder" in path
            for m in (_DECODER_LAYER_RE.match(n) for n in path)
            if m
        }
    )
    enc_depth = {key: i + 1 for i, key in enumerate(encoder)}
    dec_depth = {key: len(encoder) + i + 1 for i, key in enumerate(decoder)}
    top = len(encoder) + len(decoder) + 1

    def depth(path):
        names = path_names(path)
        for n in names:
            m = _BLOCK_RE.match(n)
            if m:
                return enc_depth[(int(m.group(1)), int(m.group(2)))]
        if "decoder" in names:
            for n in names:
                m = _DECODER_LAYER_RE.match(n)
                if m:
                    return dec_depth[int(m.group(1))]
        if "embeddings" in names:
            return 0
        return top

    return jax.tree_util.tree_map_with_path(lambda p, _: depth(p), params), top


def layerwise_lr_scales(params, decay: float) -> Any:
    """Pytree of floats: decay ** (top_layer - depth); the last layer and the heads get 1,
    the embeddings decay ** num_layers (the original's `lr_layer_decay_rate`).

    Layers stored stacked (`scan_layers`, funnel_jax/layer_stack.py) get one scale per layer:
    a float32 array [n, 1, ...] that broadcasts over the stacked leaf [n, ...]."""
    from funnel_jax import layer_stack

    if layer_stack.is_stacked(params):
        per_layer = jax.eval_shape(layer_stack.unstack_layers, params)
        scales = layerwise_lr_scales(per_layer, decay)
        stacked = layer_stack.stack_layers(
            jax.tree.map(lambda s: np.asarray(s, np.float32), scales)
        )
        return jax.tree.map(
            lambda s, p: np.reshape(s, np.shape(s) + (1,) * (np.ndim(p) - np.ndim(s))),
            stacked,
            params,
        )
    depths, top = layer_depths(params)
    last_layer = top - 1
    return jax.tree.map(lambda d: float(decay ** max(last_layer - min(d, last_layer), 0)), depths)


def scale_by_layer_depth(decay: float) -> optax.GradientTransformation:
    """Multiply each update by `layerwise_lr_scales(params, decay)` (computed from the paths)."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        scales = layerwise_lr_scales(updates, decay)
        updates = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm (the same arithmetic), reusing the gradients' global norm when
    the caller passes it as the extra argument `grad_norm` (train_state.make_train_step does:
    the norm is also its `grad_norm` metric), instead of reducing every leaf a second time."""

    def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        g_norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        trigger = jnp.squeeze(g_norm < max_norm)

        def clip(t):
            return jax.lax.select(trigger, t, (t / g_norm.astype(t.dtype)) * max_norm)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def make_optimizer(
    config: OptimizerConfig, total_steps: int | None = None
) -> optax.GradientTransformation:
    """The full AdamW chain described in the module docstring."""
    schedule = learning_rate_schedule(config, total_steps)
    parts = []
    if config.clip_norm:
        parts.append(clip_by_global_norm(config.clip_norm))
    parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
    if config.layerwise_lr_decay != 1.0:
        parts.append(scale_by_layer_depth(config.layerwise_lr_decay))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)
