"""Accelerator hygiene: float32 attention scores under bf16 compute, the fused_bias path's
limits and layout, and ELECTRA's token selection without a sort over the length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import funnel_jax as fj
from funnel_jax.layers import AttentionInputs, FunnelRelMultiheadAttention


def _attention_case(attention_impl="einsum", d_model=64, n_head=1, d_head=64):
    config = fj.FunnelConfig(
        vocab_size=32,
        block_sizes=[1],
        num_decoder_layers=0,
        d_model=d_model,
        n_head=n_head,
        d_head=d_head,
        d_inner=8,
        attention_impl=attention_impl,
    )
    return config


def _inputs(batch, length, d_model):
    return AttentionInputs(
        position=(jnp.zeros((2 * length, d_model), jnp.float32),),
        token_type_mat=jnp.ones((batch, length, length), bool),
        attention_mask=jnp.ones((batch, length), jnp.float32),
        cls_mask=None,
    )


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_bf16_attention_scores_are_accumulated_in_float32():
    """bf16 inputs and weights chosen so that every product and every projection is exact in
    bf16 (small integers times powers of two); the scores themselves are not representable in
    bf16. Summed in float32 the probabilities match a float64 softmax up to their own bf16
    rounding; rounded to bf16 first (the old `einsum(...).astype(float32)`) they do not."""
    b, length, d = 2, 16, 64
    config = _attention_case(d_model=d, d_head=d)
    module = FunnelRelMultiheadAttention(config, 0, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    rng = np.random.RandomState(0)
    x = rng.randint(-1, 2, (b, length, d)).astype(np.float32)
    wq = rng.randint(-1, 2, (d, 1, d)).astype(np.float32) * 0.5
    wk = rng.randint(-1, 2, (d, 1, d)).astype(np.float32) * 0.5
    inputs = _inputs(b, length, d)
    params = module.init(jax.random.PRNGKey(0), x, x, inputs)["params"]
    params = jax.tree.map(jnp.zeros_like, nn_unbox(params))  # no positional / type / bias terms
    params["q_head"]["kernel"] = jnp.asarray(wq)
    params["k_head"]["kernel"] = jnp.asarray(wk)
    _, prob = module.apply({"params": params}, x, x, inputs, output_attentions=True)
    assert prob.dtype == jnp.bfloat16

    q = np.einsum("bsd,dh->bsh", x.astype(np.float64), wq[:, 0]) / 8.0  # scale 1/sqrt(64)
    k = np.einsum("btd,dh->bth", x.astype(np.float64), wk[:, 0])
    assert np.array_equal(q.astype(ml_dtypes.bfloat16).astype(np.float64), q)  # exact in bf16
    scores = np.einsum("bsh,bth->bst", q, k)
    assert np.abs(scores).max() > 4.0  # large enough for bf16 rounding to show
    ref = _softmax(scores)
    bf16_summed = _softmax(scores.astype(ml_dtypes.bfloat16).astype(np.float64))
    # Relative errors: bf16 rounds every probability to 8 significant bits, whatever its size.
    err_bf16_summed = np.abs(bf16_summed / ref - 1).max()
    err = np.abs(np.asarray(prob[:, 0], np.float64) / ref - 1).max()
    assert err <= 2.0**-8, err  # the probabilities' own bf16 rounding (8-bit mantissa)
    assert err * 4 < err_bf16_summed, (err, err_bf16_summed)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_fused_bias_with_attention_dropout_raises():
    config = _attention_case("fused_bias", d_model=16, n_head=2, d_head=8)
    config = config.replace(attention_dropout=0.1)
    module = fj.FunnelModel(config=config)
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 8), jnp.int32)
    module.apply({"params": params}, ids)  # deterministic: fine
    with pytest.raises(ValueError, match="fused_bias.*does not apply with attention dropout"):
        module.apply(
            {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)}
        )
    # Without attention dropout, training with the fused path works.
    no_drop = fj.FunnelModel(config=config.replace(attention_dropout=0.0))
    no_drop.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})


def _eqns(jaxpr):
    """Every equation of a jaxpr, sub-jaxprs (pjit, custom_vjp, remat, scan) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def _score_transposes(fn, *args, length: int) -> list:
    """Transposes of [.., S, T]- or [.., S, R]-shaped tensors (scores or their bias)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    found = []
    for eqn in _eqns(jaxpr):
        if eqn.primitive.name != "transpose":
            continue
        shape = tuple(eqn.invars[0].aval.shape)
        if len(shape) == 4 and shape[-2:] in ((length, length), (length, 2 * length)):
            found.append(shape)
    return found


@pytest.mark.parametrize("attention_type", ["relative_shift", "factorized"])
def test_fused_bias_builds_its_bias_without_a_transpose(attention_type):
    b, length, n, h = 2, 12, 3, 8  # all different, so shapes say which tensor is which
    config = _attention_case("fused_bias", d_model=n * h, n_head=n, d_head=h)
    config = config.replace(attention_type=attention_type)
    module = FunnelRelMultiheadAttention(config, 0)
    x = jnp.asarray(np.random.RandomState(0).randn(b, length, n * h), jnp.float32)
    inputs = _inputs(b, length, n * h)
    if attention_type == "factorized":
        e = jnp.ones((length, n * h), jnp.float32)
        inputs = inputs.replace(position=(e, e, e, e))
    params = module.init(jax.random.PRNGKey(0), x, x, inputs)["params"]

    def fused(p):
        return module.apply({"params": p}, x, x, inputs)[0]

    assert not _score_transposes(fused, params, length=length)
    # The check can fail: the einsum path hands back its [N, B, S, T] map transposed.
    plain = FunnelRelMultiheadAttention(config.replace(attention_impl="einsum"), 0)

    def with_map(p):
        return plain.apply({"params": p}, x, x, inputs, output_attentions=True)[1]

    assert _score_transposes(with_map, params, length=length)


# --- ELECTRA token selection -----------------------------------------------------------------


def _mask_kwargs(num_predict, vocab_size=50):
    return dict(
        special_ids=np.asarray([4, 0, 9, 3]),  # unsorted on purpose
        vocab_size=vocab_size,
        mask_id=4,
        mask_prob=0.25,
        mask_token_prob=0.8,
        random_token_prob=0.1,
        num_predict=num_predict,
    )


def _batch(rng, batch=4, length=24):
    ids = rng.randint(10, 50, (batch, length)).astype(np.int32)
    ids[:, 0] = 3
    am = np.ones_like(ids)
    am[1, 17:] = 0
    ids[1, 17:] = 0
    ids[2, 5] = 9
    return jnp.asarray(ids), jnp.asarray(am)


def test_top_k_selects_the_positions_a_stable_argsort_would():
    """Same draws, same targets in the same order as argsort over the length (the old
    selection), including the padding slots once the candidates run out."""
    from funnel_jax.electra import mask_tokens

    ids, am = _batch(np.random.RandomState(0))
    num_predict = 20  # more slots than row 1's candidates
    fn = jax.jit(lambda r: mask_tokens(r, ids, am, **_mask_kwargs(num_predict)))
    lowered = jax.make_jaxpr(fn)(jax.random.PRNGKey(0))
    names = {e.primitive.name for e in _eqns(lowered.jaxpr)}
    assert "top_k" in names and "sort" not in names, names
    special = np.isin(np.asarray(ids), [0, 3, 4, 9])
    candidate = (np.asarray(am) == 1) & ~special
    for seed in range(5):
        rng = jax.random.PRNGKey(seed)
        out = jax.device_get(fn(rng))
        r_pick = jax.random.split(rng, 3)[0]
        u = np.asarray(jax.random.uniform(r_pick, ids.shape))
        expected = np.argsort(np.where(candidate, u, 2.0), axis=-1, kind="stable")
        np.testing.assert_array_equal(out["positions"], expected[:, :num_predict])
        rows = np.arange(ids.shape[0])[:, None]
        np.testing.assert_array_equal(out["targets"], np.asarray(ids)[rows, out["positions"]])
        is_target = np.zeros(ids.shape, bool)
        is_target[rows, out["positions"]] |= out["valid"]
        np.testing.assert_array_equal(out["is_target"], is_target)
        untouched = np.asarray(ids).copy()
        np.testing.assert_array_equal(out["masked_ids"][~is_target], untouched[~is_target])


def test_targets_are_uniform_over_the_candidates():
    """Over 4,000 draws every candidate is a target with probability n_target / n_cand
    (4-sigma bounds) and no special or padding token ever is."""
    from funnel_jax.electra import mask_tokens

    ids, am = _batch(np.random.RandomState(1))
    draws = 4000
    keys = jax.random.split(jax.random.PRNGKey(3), draws)
    fn = jax.jit(jax.vmap(lambda r: mask_tokens(r, ids, am, **_mask_kwargs(8))["is_target"]))
    freq = np.asarray(fn(keys)).mean(0)
    candidate = (np.asarray(am) == 1) & ~np.isin(np.asarray(ids), [0, 3, 4, 9])
    assert np.all(freq[~candidate] == 0)
    for row in range(ids.shape[0]):
        n_cand = candidate[row].sum()
        p = min(max(round(0.25 * n_cand), 1), 8) / n_cand
        sigma = np.sqrt(p * (1 - p) / draws)
        assert np.all(np.abs(freq[row][candidate[row]] - p) < 4 * sigma), (row, freq[row], p)


def test_random_replacements_cover_the_regular_ids_without_a_gather():
    from funnel_jax.electra import nth_regular_id

    special = np.asarray([7, 0, 3, 4, 49])  # unsorted; ids up to vocab_size - 1 = 49
    regular = np.setdiff1d(np.arange(50), np.asarray(special))
    rank = jnp.arange(len(regular), dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(nth_regular_id(rank, special)), regular)
    jaxpr = jax.make_jaxpr(lambda r: nth_regular_id(r, special))(rank).jaxpr
    names = {e.primitive.name for e in _eqns(jaxpr)}
    assert "gather" not in names, names
