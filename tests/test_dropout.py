"""The hashed dropout masks (`FunnelConfig.dropout_rng="hash"`, funnel_jax/dropout.py).

The expected values are those of independent fair bits and Bernoulli(p) draws (binomial
standard deviations, the birthday bound), not figures taken from the hash. The mesh
invariance of a whole training step is checked in tests/test_mesh.py.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from funnel_jax import FunnelConfig
from funnel_jax.dropout import (
    HASH_PRNG,
    dropout_key,
    hash_bits,
    hash_keep_mask,
    resolve_dropout_rng,
)
from funnel_jax.models import FunnelForPreTraining, FunnelModel, init_params
from tests.test_dropout_remat import TINY  # a 2-block stacked model, dropout on

SIGMAS = 5.0  # every statistical bound below: 5 standard deviations (a false alarm ~ 1e-6)


def _bits(key, shape) -> np.ndarray:
    return np.asarray(jax.jit(hash_bits, static_argnums=1)(key, shape))


@pytest.mark.parametrize("shape", [(1 << 20,), (1024, 1024), (16, 8, 64, 128)])
def test_bits_are_fair_and_rarely_repeat(shape):
    bits = _bits(jax.random.key(0), shape).ravel()
    n = bits.size
    per_bit = np.unpackbits(bits.view(np.uint8)).reshape(n, 32).mean(axis=0)
    assert np.all(np.abs(per_bit - 0.5) < SIGMAS * math.sqrt(0.25 / n)), per_bit
    # Along the last axis the hash is a bijection of the index, so a row never repeats a
    # value; pairs in different rows collide as independent draws from 2**32 values would
    # (about pairs / 2**32 times, Poisson).
    t = shape[-1]
    pairs = (n * (n - 1) - (n // t) * t * (t - 1)) / 2
    expected = pairs / 2.0**32
    repeats = n - np.unique(bits).size
    assert abs(repeats - expected) <= SIGMAS * math.sqrt(expected), (repeats, expected)
    for row in bits.reshape(-1, t)[:4]:
        assert np.unique(row).size == t


@pytest.mark.parametrize("keep_prob", [0.9, 0.5])
def test_keep_masks_have_the_rate_and_no_neighbour_correlation(keep_prob):
    shape = (32, 8, 128, 128)
    mask = np.asarray(hash_keep_mask(jax.random.key(1), keep_prob, shape))
    n = mask.size
    sd = math.sqrt(keep_prob * (1 - keep_prob) / n)
    assert abs(mask.mean() - keep_prob) < SIGMAS * sd, (mask.mean(), keep_prob)
    x = mask.astype(np.float64) - keep_prob
    for axis in range(mask.ndim):
        a = np.take(x, np.arange(shape[axis] - 1), axis=axis)
        b = np.take(x, np.arange(1, shape[axis]), axis=axis)
        corr = float(np.mean(a * b)) / (keep_prob * (1 - keep_prob))
        assert abs(corr) < SIGMAS / math.sqrt(a.size), (axis, corr)


def test_masks_of_different_keys_agree_as_independent_draws():
    p, shape = 0.9, (64, 16, 128)
    key = dropout_key(jax.random.key(2))
    masks = [np.asarray(hash_keep_mask(k, p, shape)) for k in jax.random.split(key, 4)]
    masks.append(np.asarray(hash_keep_mask(jax.random.fold_in(key, 0), p, shape)))
    agree = p * p + (1 - p) ** 2
    sd = math.sqrt(agree * (1 - agree) / masks[0].size)
    for i in range(len(masks)):
        for j in range(i):
            rate = float(np.mean(masks[i] == masks[j]))
            assert abs(rate - agree) < SIGMAS * sd, (i, j, rate, agree)


def test_bits_are_a_function_of_the_element_index_only():
    """Element (i, j, k, l) gets the same bits in any array that holds it, whatever its size:
    what makes a mask the same on every mesh (a device computes its slice of the iotas)."""
    key, shape = jax.random.key(3), (6, 5, 7, 9)
    full = _bits(key, shape)
    np.testing.assert_array_equal(_bits(key, (8, 5, 7, 9))[:6], full)
    np.testing.assert_array_equal(_bits(key, (6, 6, 7, 9))[:, :5], full)
    np.testing.assert_array_equal(_bits(key, (6, 5, 7, 16))[..., :9], full)
    np.testing.assert_array_equal(_bits(key, shape), full)  # deterministic
    assert np.mean(_bits(jax.random.key(4), shape) == full) < 0.01


def test_hash_prng_keys_split_fold_and_draw():
    key = dropout_key(jax.random.key(5))
    assert jax.random.key_impl(key) == HASH_PRNG
    words = np.asarray(jax.random.key_data(jax.random.split(key, 4096)))
    assert words.shape == (4096, 2) and len({tuple(w) for w in words}) == 4096
    folded = np.asarray([jax.random.key_data(jax.random.fold_in(key, i)) for i in range(8)])
    # fold_in(k, i) is not the i-th split key (flax folds the site's hash into scan-split keys)
    assert not np.any(np.all(folded == words[:8], axis=1))
    assert len({tuple(w) for w in folded}) == 8
    for width, dtype in ((8, np.uint8), (16, np.uint16), (32, np.uint32)):
        bits = np.asarray(jax.random.bits(key, (1 << 16,), dtype=dtype))
        assert bits.dtype == dtype
        assert abs(bits.mean() / (2.0**width - 1) - 0.5) < SIGMAS * math.sqrt(1 / 12 / bits.size)
    u = np.asarray(jax.random.uniform(key, (1 << 18,)))
    assert abs(u.mean() - 0.5) < SIGMAS * math.sqrt(1 / 12 / u.size)
    # the key's data is kept: the same words wrap to the same key
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(5)))


def test_dropout_key_rejects_an_unknown_rng():
    with pytest.raises(ValueError, match="dropout_rng"):
        dropout_key(jax.random.key(0), "philox")
    with pytest.raises(ValueError, match="FunnelConfig.dropout_rng"):
        FunnelConfig(dropout_rng="philox")


def test_hashed_dropout_in_the_model():
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 16)))
    threefry = FunnelModel(FunnelConfig(**TINY))
    hashed = FunnelModel(FunnelConfig(**TINY, dropout_rng="hash"))
    params = threefry.init({"params": jax.random.key(0)}, ids)["params"]

    def apply(module, key, deterministic=False):
        return module.apply(
            {"params": params}, ids, deterministic=deterministic, rngs={"dropout": key}
        ).last_hidden_state

    def run(module, key, deterministic=False):
        return jax.jit(apply, static_argnums=(0, 2))(module, key, deterministic)

    plain = run(threefry, jax.random.key(1), deterministic=True)
    np.testing.assert_array_equal(run(hashed, jax.random.key(1), deterministic=True), plain)
    a = run(hashed, dropout_key(jax.random.key(1)))
    np.testing.assert_array_equal(a, run(hashed, dropout_key(jax.random.key(1))))
    assert float(jnp.max(jnp.abs(a - plain))) > 0.1  # dropout is on
    assert float(jnp.max(jnp.abs(a - run(hashed, dropout_key(jax.random.key(2)))))) > 0.1
    # a plain key works too (the per-site keys are then threefry fold-ins)
    b = run(hashed, jax.random.key(1))
    assert bool(jnp.all(jnp.isfinite(b))) and float(jnp.max(jnp.abs(b - a))) > 0.1

    def ops(module, key):  # threefry in the lowered program
        return jax.jit(apply, static_argnums=0).lower(module, key).as_text().count("threefry")

    assert ops(threefry, jax.random.key(1)) > 0
    assert ops(hashed, jax.random.key(1)) > 0  # the per-site fold-ins
    assert ops(hashed, dropout_key(jax.random.key(1))) == 0


def test_hashed_dropout_under_remat_gives_the_unrematerialized_gradients():
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, 64, (2, 16)))
    labels = jnp.asarray(rs.randint(0, 2, (2, 16)))
    out = {}
    params = None  # the same tree for both policies: initialise once
    for policy in ("none", "dots_no_batch_probs"):  # the shipped large's policy
        module = FunnelForPreTraining(FunnelConfig(**TINY, remat_policy=policy, dropout_rng="hash"))
        if params is None:
            params = init_params(module, jax.random.key(0))

        def loss(p, module=module):
            return module.apply(
                {"params": p},
                ids,
                labels=labels,
                deterministic=False,
                rngs={"dropout": dropout_key(jax.random.key(3))},
            ).loss

        out[policy] = jax.jit(jax.value_and_grad(loss))(params)
    loss0, grad0 = out["none"]
    loss, grad = out["dots_no_batch_probs"]
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grad, grad0)
    assert max(jax.tree.leaves(diffs)) < 1e-6, diffs


def test_auto_picks_the_hash_on_tpu_only():
    assert resolve_dropout_rng("auto", "tpu") == "hash"
    assert resolve_dropout_rng("auto", "cuda") == "threefry"
    assert resolve_dropout_rng("auto", "cpu") == "threefry"
    assert resolve_dropout_rng("auto") == "threefry"  # the tests run on the CPU
    assert resolve_dropout_rng("hash", "cuda") == "hash"
    assert jax.random.key_impl(dropout_key(jax.random.key(0), "auto")) != HASH_PRNG
    with pytest.raises(ValueError, match="dropout_rng"):
        resolve_dropout_rng("fast")


@pytest.mark.parametrize("rng", ["threefry", "hash"])
def test_gumbel_samples_follow_the_softmax(rng):
    """The ELECTRA generator's sampling (argmax of logits + Gumbel noise) draws each category
    with its softmax probability, with hashed noise as with threefry's."""
    from funnel_jax.electra import gumbel_sample

    logits = jnp.asarray([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    n = 1 << 17
    key = dropout_key(jax.random.key(8), rng)
    samples = np.asarray(jax.jit(gumbel_sample)(key, jnp.broadcast_to(logits, (n, 8))))
    counts = np.bincount(samples, minlength=8)
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) < SIGMAS * sd), (counts, n * p)


def _threefry_draw_sizes(lowered_text: str) -> list[int]:
    """Elements of each threefry call's first result in a lowered (StableHLO) program."""
    sizes = []
    for line in lowered_text.splitlines():
        if "call @" in line and "threefry" in line:
            result = line.rsplit("->", 1)[-1]
            dims = re.search(r"tensor<([\dx]*)x?ui32>", result)
            shape = [int(d) for d in dims.group(1).split("x") if d] if dims else []
            sizes.append(int(np.prod(shape)) if shape else 1)
    return sizes


def test_hashed_pretraining_objective_draws_no_threefry_per_element():
    """With dropout_rng="hash" the ELECTRA step's masking and sampling are hashes as well: the
    only threefry left is the step key's split into its 5 streams."""
    from funnel_jax import electra
    from funnel_jax.data import SpecialIds

    special = SpecialIds(cls=2, sep=3, pad=0, mask=4, all=(0, 1, 2, 3, 4), vocab_size=64)
    ids = jnp.full((2, 16), 7, jnp.int32).at[:, 0].set(2)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids * 0}
    sizes = {}
    for rng in ("threefry", "hash"):
        config = FunnelConfig(**{**TINY, "n_head": 4, "d_head": 8, "dropout_rng": rng})
        objective = electra.make_objective(config, electra.ObjectiveConfig(), special, 16)
        params = objective.abstract_params()  # lowering needs the shapes only
        text = jax.jit(objective.loss).lower(params, batch, jax.random.PRNGKey(1)).as_text()
        sizes[rng] = _threefry_draw_sizes(text)
    # with threefry: the masking's [2, 16] uniform draw and the [2, P, 64] Gumbel noise
    assert max(sizes["threefry"]) >= 2 * 16, sizes["threefry"]
    assert sizes["hash"] and max(sizes["hash"]) <= 5 * 2, sizes["hash"]
