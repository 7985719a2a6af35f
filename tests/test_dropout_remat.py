"""Dropout under remat: the `dots_no_batch_probs_masks` policy keeps the dropout keep masks, so
the backward pass replays the forward's masks without drawing their random bits again."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnel_jax import FunnelConfig
from funnel_jax.models import FunnelForPreTraining

TINY = dict(
    vocab_size=64,
    block_sizes=[2, 1],
    d_model=32,
    n_head=2,
    d_head=16,
    d_inner=64,
    num_decoder_layers=1,
    scan_layers=True,
)
POLICIES = ("none", "dots_no_batch_probs", "dots_no_batch_probs_masks")


def _loss_fn(policy: str):
    module = FunnelForPreTraining(FunnelConfig(**TINY, remat_policy=policy))
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, 64, (2, 16)))
    labels = jnp.asarray(rs.randint(0, 2, (2, 16)))
    params = module.init({"params": jax.random.PRNGKey(0)}, ids)["params"]

    def loss(p):
        return module.apply(
            {"params": p},
            ids,
            labels=labels,
            deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(3)},
        ).loss

    return loss, params


def _count(jaxpr, name: str) -> int:
    """Equations of primitive `name` in a jaxpr and all the jaxprs nested in it."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for j in v if isinstance(v, (list, tuple)) else (v,):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    n += _count(j.jaxpr, name)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    n += _count(j, name)
    return n


@pytest.fixture(scope="module")
def grads():
    out = {}
    for policy in ("none", "dots_no_batch_probs_masks"):  # the plain policy: tests/test_parity.py
        loss, params = _loss_fn(policy)
        out[policy] = jax.jit(jax.value_and_grad(loss))(params)
    return out


def test_remat_with_dropout_gives_the_unrematerialized_gradients(grads):
    loss0, grad0 = grads["none"]
    assert float(loss0) > 0
    for policy in set(grads) - {"none"}:
        loss, grad = grads[policy]
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grad, grad0)
        assert max(jax.tree.leaves(diffs)) < 1e-6, (policy, diffs)


def test_saved_masks_draw_no_random_bits_in_the_backward():
    counts = {}
    for policy in POLICIES:
        loss, params = _loss_fn(policy)
        forward = _count(jax.make_jaxpr(loss)(params).jaxpr, "random_bits")
        both = _count(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, "random_bits")
        counts[policy] = (forward, both)
    assert counts["none"][0] > 0, counts
    assert counts["none"][1] == counts["none"][0], counts
    # the masks are drawn again in the backward under the plain policy, not when they are kept
    assert counts["dots_no_batch_probs"][1] > counts["dots_no_batch_probs"][0], counts
    assert counts["dots_no_batch_probs_masks"][1] == counts["dots_no_batch_probs_masks"][0], counts
