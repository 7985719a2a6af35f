"""A train state pytree and a generic, pure, jit-able train step.

    state = TrainState.create(params, optimizer, seed)
    step_fn = make_train_step(loss_fn, optimizer, grad_accum_steps=2)
    step_fn = jit_train_step(step_fn)                  # jax.jit(..., donate_argnums=0)
    state, metrics = step_fn(state, batch)

`loss_fn(params, batch, rng) -> (loss, metrics)`: a scalar loss and a dict of scalar metrics.
The step's randomness comes only from `state.rng` (split inside the step), so a run restored
from a checkpoint draws the same numbers as an uninterrupted one.

Gradient accumulation is an explicit `lax.scan` over micro-batches inside the one jitted step:
the batch's leading dimension is split into `grad_accum_steps` equal micro-batches, the
gradients and metrics are averaged over them (micro-batch `i` uses `fold_in(step_rng, i)`).

Non-finite guard: when the loss or the gradient norm is not finite, the update is dropped
(params and optimizer state are returned unchanged) but `step` still advances and the metric
`skipped` is 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params; opt_state; rng: a raw uint32[2] PRNG key."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation, seed_or_key) -> TrainState:
        if isinstance(seed_or_key, int):
            rng = jax.random.PRNGKey(seed_or_key)
        else:
            rng = jnp.asarray(seed_or_key)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=rng,
        )


def abstract_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """TrainState of jax.ShapeDtypeStruct leaves (what a checkpoint restore needs)."""
    return jax.eval_shape(lambda p: TrainState.create(p, optimizer, 0), params)


def _tree_where(cond, new, old):
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def _split_micro_batches(batch, k: int):
    """[B, ...] -> [k, B / k, ...] with micro-batch i = rows i, i + k, i + 2k, ... (strided).

    A batch sharded over data x fsdp holds contiguous blocks of rows per shard; a strided split
    gives every micro-batch B / (k * shards) rows of every block, so the split needs no rows
    moved across shards (a contiguous split would put micro-batch 0 on the first shards only).
    """

    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % k:
            raise ValueError(
                f"gradient accumulation over {k} micro-batches needs every batch array's leading "
                f"dimension to be a multiple of {k}; got shape {x.shape}"
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def schedule_count(opt_state, default):
    """The learning-rate schedule's own update count in `opt_state` (optax's
    ScaleByScheduleState.count, which a skipped step does not advance), else `default`."""
    found = [
        x.count
        for x in jax.tree.leaves(
            opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState)
        )
        if isinstance(x, optax.ScaleByScheduleState)
    ]
    return found[0] if found else default


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    learning_rate_fn: Callable | None = None,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A pure `train_step(state, batch) -> (state, metrics)`; jit it with `jit_train_step`.

    metrics: the loss_fn's metrics (averaged over micro-batches) plus `loss`, `grad_norm`
    (before clipping), `skipped` (0/1) and, given learning_rate_fn, `learning_rate` (the rate
    of this update, from the schedule's count in the optimizer state).
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def compute_grads(params, batch, rng):
        if grad_accum_steps == 1:
            (loss, metrics), grads = grad_fn(params, batch, rng)
            return loss, metrics, grads
        micro = _split_micro_batches(batch, grad_accum_steps)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        first = jax.tree.map(lambda x: x[0], micro)
        metric_shapes = jax.eval_shape(lambda: grad_fn(params, first, rng)[0])
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), metric_shapes)

        def body(carry, xs):
            g_acc, m_acc = carry
            mb, i = xs
            out, g = grad_fn(params, mb, jax.random.fold_in(rng, i))
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            m_acc = jax.tree.map(lambda a, b: a + jnp.asarray(b, jnp.float32), m_acc, out)
            return (g_acc, m_acc), None

        (g_sum, (loss_sum, m_sum)), _ = jax.lax.scan(
            body, (zeros, zero_metrics), (micro, jnp.arange(grad_accum_steps))
        )
        scale = 1.0 / grad_accum_steps
        grads = jax.tree.map(lambda g, p: (g * scale).astype(p.dtype), g_sum, params)
        metrics = jax.tree.map(lambda m: m * scale, m_sum)
        return loss_sum * scale, metrics, grads

    # An optax chain (GradientTransformationExtraArgs) takes the step's gradient norm as the
    # extra argument `grad_norm` (optim.clip_by_global_norm reads it), so it is computed once.
    norm_kwarg = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def update(grads, opt_state, params, grad_norm):
        kwargs = {"grad_norm": grad_norm} if norm_kwarg else {}
        updates, new_opt_state = optimizer.update(grads, opt_state, params, **kwargs)
        return optax.apply_updates(params, updates), new_opt_state

    def train_step(state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng, step_rng = jax.random.split(state.rng)
        loss, metrics, grads = compute_grads(state.params, batch, step_rng)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_params, new_opt_state = update(grads, state.opt_state, state.params, grad_norm)
        if skip_nonfinite:
            # A select per leaf: XLA fuses it into the leaf's update kernel (a lax.cond over the
            # update instead gave no fewer kernels and 0.26 GiB more temporaries; BENCHMARKS.md).
            new_params = _tree_where(ok, new_params, state.params)
            new_opt_state = _tree_where(ok, new_opt_state, state.opt_state)
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["skipped"] = (~ok).astype(jnp.int32)
        if learning_rate_fn is not None:  # the rate this update used (not after a skip)
            metrics["learning_rate"] = learning_rate_fn(schedule_count(state.opt_state, state.step))
        new_state = state.replace(
            step=state.step + 1, params=new_params, opt_state=new_opt_state, rng=rng
        )
        return new_state, metrics

    return train_step


def jit_train_step(train_step, shardings=None, donate: bool = True):
    """jax.jit the step with the state donated.

    `shardings`: None (let jit decide: single device), or `(state_shardings, batch_shardings)`
    pytrees of jax.sharding.Sharding (the device-mesh hook): they become in_shardings and the
    state's out_shardings (metrics are left to the compiler).
    """
    kwargs = {}
    if shardings is not None:
        state_sh, batch_sh = shardings
        kwargs = dict(in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
    return jax.jit(train_step, donate_argnums=(0,) if donate else (), **kwargs)
