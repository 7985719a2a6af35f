"""The train step's bookkeeping (funnel_jax/train_state.py, optim.py): the gradients' global norm
is computed once (the clipping reuses the step's `grad_norm`), with results equal bit for bit
to those of optax's own clipping, the non-finite skip included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funnel_jax.optim import (
    OptimizerConfig,
    clip_by_global_norm,
    learning_rate_schedule,
    make_optimizer,
)
from funnel_jax.train_state import TrainState, jit_train_step, make_train_step


def _tree(scale: float):
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(5, 3)) * scale, jnp.float32),
        "b": {"c": jnp.asarray(rng.normal(size=(7,)) * scale, jnp.float32)},
    }


@pytest.mark.parametrize("scale", [0.01, 10.0])  # below and above the clipping norm
def test_clipping_with_the_given_norm_equals_optax(scale):
    grads = _tree(scale)
    ref, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    ours = clip_by_global_norm(1.0)
    given, _ = ours.update(grads, optax.EmptyState(), grad_norm=optax.tree.norm(grads))
    computed, _ = ours.update(grads, optax.EmptyState())
    for out in (given, computed):
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            np.testing.assert_array_equal(a, b)


def _loss(params, batch, rng):
    del rng
    pred = batch["x"] @ params["w"] + params["b"]
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"]
    return loss, {}


def _setup():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 4)) * 30, jnp.float32),  # a norm above the clip
        "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "scale": jnp.float32(1.0),
    }
    cfg = OptimizerConfig(learning_rate=0.1, total_steps=10, clip_norm=1.0)
    return params, batch, cfg


def _reference_step(cfg):
    """The step as written before: optax's clipping (its own norm), a select per leaf."""
    tx = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.scale_by_learning_rate(learning_rate_schedule(cfg)),
    )

    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(params, batch, None)
        norm = optax.tree.norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(norm)
        keep = lambda n, o: jax.tree.map(lambda x, y: jnp.where(ok, x, y), n, o)  # noqa: E731
        return keep(new_params, params), keep(new_opt, opt_state), norm

    return tx, jax.jit(step)


def test_train_step_equals_the_per_leaf_reference_bit_for_bit():
    params, batch, cfg = _setup()
    tx = make_optimizer(cfg)
    step = jit_train_step(make_train_step(_loss, tx), donate=False)
    ref_tx, ref_step = _reference_step(cfg)
    state = TrainState.create(params, tx, 0)
    ref_params, ref_opt = params, ref_tx.init(params)
    for i, scale in enumerate([1.0, 1.0, float("nan"), 1.0]):
        b = {**batch, "scale": jnp.float32(scale)}
        state, metrics = step(state, b)
        ref_params, ref_opt, ref_norm = ref_step(ref_params, ref_opt, b)
        assert int(metrics["skipped"]) == int(scale != scale), i
        assert float(metrics["grad_norm"]) > cfg.clip_norm or scale != scale  # clipping acts
        np.testing.assert_array_equal(metrics["grad_norm"], ref_norm)
        for a, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params), strict=True):
            np.testing.assert_array_equal(a, r)
        for a, r in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_opt), strict=True):
            np.testing.assert_array_equal(a, r)


def _scalar_sqrts(jaxpr) -> int:
    """Scalar `sqrt` equations in a jaxpr and all its sub-jaxprs (cond branches, pjit, ...)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sqrt" and eqn.outvars[0].aval.shape == ():
            count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _scalar_sqrts(inner)
    return count


def test_the_global_norm_is_computed_once():
    """One global norm (a scalar sqrt) in the step: the metric's, reused by the clipping;
    an optimizer that cannot take it (a plain GradientTransformation) still works."""
    params, batch, cfg = _setup()
    tx = make_optimizer(cfg)
    state = TrainState.create(params, tx, 0)
    jaxpr = jax.make_jaxpr(make_train_step(_loss, tx))(state, batch).jaxpr
    assert _scalar_sqrts(jaxpr) == 1
    plain = optax.GradientTransformation(tx.init, lambda u, s, p=None: tx.update(u, s, p))
    jaxpr = jax.make_jaxpr(make_train_step(_loss, plain))(state, batch).jaxpr
    assert _scalar_sqrts(jaxpr) == 2  # the metric's and the clipping's own
    new_state, metrics = jax.jit(make_train_step(_loss, plain))(state, batch)
    assert int(metrics["skipped"]) == 0 and int(new_state.step) == 1
