"""scan_layers: parameters stored stacked, converted exactly to and from transformers' layout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import funnel_jax as fj
from funnel_jax import layer_stack
from funnel_jax.layers import Dropout
from funnel_jax.weights import params_to_state_dict, state_dict_to_params
from tests.reference import sample_inputs, torch_config, torch_model

CASES = {
    "plain": dict(block_sizes=[3, 2, 2]),
    "repeats_factorized": dict(
        block_sizes=[2, 1, 2], block_repeats=[1, 3, 2], attention_type="factorized"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("class_name", ["FunnelForPreTraining", "FunnelBaseModel"])
def test_state_dict_round_trip_through_stacked_params_is_exact(name, class_name):
    tmodel = torch_model(class_name, torch_config(**CASES[name]))
    state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    config = fj.FunnelConfig.from_dict(tmodel.config.to_dict(), scan_layers=True)
    module = fj.MODEL_CLASSES[class_name](config=config)
    params = state_dict_to_params(state, module)
    assert layer_stack.is_stacked(params)
    abstract = fj.abstract_params(module)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert jax.tree.map(lambda a, b: a.shape == b.shape, params, abstract)
    back = params_to_state_dict(params, module)
    assert set(back) == set(state) - {"lm_head.weight"}
    for key, value in state.items():
        if key in back:
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key


def test_stacked_and_unrolled_models_agree_on_the_same_weights():
    """Same weights, same inputs: outputs, every hidden state and attention map within the
    parity tolerance (the scan's body compiles on its own, so rounding may differ by ulps)."""
    config = fj.FunnelConfig(vocab_size=64, d_model=16, n_head=2, d_head=8, d_inner=24)
    config = config.replace(block_sizes=(2, 2, 2), block_repeats=(2, 1, 2))
    unrolled = fj.FunnelModel(config=config)
    stacked = fj.FunnelModel(config=config.replace(scan_layers=True))
    params = fj.init_params(unrolled, jax.random.PRNGKey(0))
    inputs = sample_inputs(64, seq_len=16)
    kw = dict(output_hidden_states=True, output_attentions=True)
    a = unrolled.apply({"params": params}, **inputs, **kw)
    b = stacked.apply({"params": layer_stack.stack_layers(params)}, **inputs, **kw)
    assert len(a.hidden_states) == len(b.hidden_states) == 1 + 2 * 2 + 2 + 2 * 2 + 1 + 2
    for x, y in zip(a.hidden_states + a.attentions, b.hidden_states + b.attentions, strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=0)
    back = layer_stack.unstack_layers(layer_stack.stack_layers(params))
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), back, params))


def test_few_large_leaves_and_a_layers_axis():
    config = fj.FunnelConfig(vocab_size=64, d_model=16, n_head=2, d_head=8, d_inner=24)
    unrolled = fj.abstract_params(fj.FunnelForPreTraining(config=config))
    boxed = fj.abstract_params(
        fj.FunnelForPreTraining(config=config.replace(scan_layers=True)), unbox=False
    )
    stacked = nn.meta.unbox(boxed)
    # Default 4-4-4 blocks, 2 decoder layers: 14 layers -> 4 stacks + 2 pooling layers.
    per_layer = 20  # parameter leaves of one FunnelLayer
    assert len(jax.tree.leaves(unrolled)) - len(jax.tree.leaves(stacked)) == (14 - 6) * per_layer
    q = boxed["funnel"]["encoder"]["blocks_0_stack"]["attention"]["q_head"]["kernel"]
    assert q.names == ("layers", "embed", "heads", "kv") and q.value.shape == (4, 16, 2, 8)
    assert stacked["funnel"]["decoder"]["layers_stack"]["ffn"]["linear_1"]["kernel"].shape[0] == 2


def test_dropout_masks_differ_between_stacked_layers():
    """With dropout on, each scanned layer (and each repeat) draws its own mask: the zeros
    the FFN's output dropout leaves differ from layer to layer, at about the dropout rate."""
    config = fj.FunnelConfig(
        vocab_size=64,
        d_model=16,
        n_head=2,
        d_head=8,
        d_inner=24,
        block_sizes=[3, 1, 1],
        block_repeats=[2, 1, 1],
        hidden_dropout=0.5,
        attention_dropout=0.0,
        scan_layers=True,
    )
    module = fj.FunnelModel(config=config)
    params = fj.init_params(module, jax.random.PRNGKey(0))
    inputs = sample_inputs(64, seq_len=16)
    _, state = module.apply(
        {"params": params},
        **inputs,
        deterministic=False,
        rngs={"dropout": jax.random.PRNGKey(1)},
        capture_intermediates=lambda mdl, _: isinstance(mdl, Dropout),
        mutable=["intermediates"],
    )
    ffn = state["intermediates"]["encoder"]["blocks_0_stack"]["ffn"]
    # The FFN's second Dropout (after linear_2), one entry per call: [layers, ...] each.
    outs = [np.asarray(v) for v in ffn["Dropout_1"]["__call__"]]
    zeros = np.concatenate([o[:, None] == 0 for o in outs], axis=1)  # [3 layers, 2 repeats, ..]
    zeros = zeros.reshape(-1, zeros[0, 0].size)
    assert zeros.shape[0] == 6
    assert np.all(np.abs(zeros.mean(1) - 0.5) < 0.1), zeros.mean(1)
    for i in range(6):
        for j in range(i):
            assert (zeros[i] != zeros[j]).mean() > 0.3, (i, j)


@pytest.mark.parametrize("name", list(CASES))
def test_layerwise_lr_scales_of_stacked_layers_equal_the_unrolled_ones(name):
    """Each entry of a stacked leaf gets the scale of the layer it holds (not one scale)."""
    from funnel_jax import optim

    kw = dict(vocab_size=64, d_model=16, n_head=2, d_head=8, d_inner=32, **CASES[name])
    unrolled = fj.init_params(fj.FunnelModel(fj.FunnelConfig(**kw)), jax.random.PRNGKey(0))
    stacked = fj.init_params(
        fj.FunnelModel(fj.FunnelConfig(**kw, scan_layers=True)), jax.random.PRNGKey(0)
    )
    want = jax.tree.map(
        lambda s, p: np.broadcast_to(np.float32(s), p.shape),
        optim.layerwise_lr_scales(unrolled, 0.8),
        unrolled,
    )
    got = optim.layerwise_lr_scales(stacked, 0.8)
    got = layer_stack.unstack_layers(
        jax.tree.map(lambda s, p: np.broadcast_to(s, p.shape), got, stacked)
    )
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, g), w in zip(
        jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))
    assert len({float(x) for x in jax.tree.leaves(jax.tree.map(np.max, want))}) > 3
    update = optim.scale_by_layer_depth(0.8).update
    ones = jax.tree.map(jnp.ones_like, stacked)
    scaled, _ = jax.jit(update)(ones, optax_empty_state())
    assert jax.tree.structure(scaled) == jax.tree.structure(stacked)


def optax_empty_state():
    import optax

    return optax.EmptyState()
