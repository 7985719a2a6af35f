"""TPU by design: the factorized, one-hot configuration compiles to a program without gather
or scatter (forward and train step), with static shapes only."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

import funnel_jax as fj
from funnel_jax import losses


def _config(**kw):
    base = dict(vocab_size=64, block_sizes=[1, 1, 1], d_model=16, n_head=2, d_head=8, d_inner=24)
    base.update(kw)
    return fj.FunnelConfig(**base)


def _hlo_ops(text: str) -> set[str]:
    """Gather-like instructions in compiled HLO text (op names, not metadata strings)."""
    return set(re.findall(r" (gather|scatter|dynamic-slice|dynamic-update-slice)\(", text))


@pytest.mark.parametrize("cls_name", ["FunnelModel", "FunnelForPreTraining"])
def test_factorized_one_hot_forward_and_train_step_have_no_gather(cls_name):
    config = _config(attention_type="factorized", one_hot_embeddings=True)
    module = fj.MODEL_CLASSES[cls_name](config=config)
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 16), jnp.int32)
    tt = jnp.zeros((2, 16), jnp.int32).at[:, 0].set(2)

    def forward(p):
        out = module.apply({"params": p}, ids, token_type_ids=tt)
        return out.logits if cls_name != "FunnelModel" else out.last_hidden_state

    hlo = jax.jit(forward).lower(params).compile().as_text()
    assert not _hlo_ops(hlo), f"forward contains {_hlo_ops(hlo)}"
    if cls_name == "FunnelForPreTraining":

        def loss(p):
            return losses.discriminator_loss(forward(p), jnp.zeros((2, 16)), None)

        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        assert not _hlo_ops(hlo), f"train step contains {_hlo_ops(hlo)}"


def test_default_embedding_lookup_is_a_gather():
    """The check above can fail: the table lookup without one-hot compiles to a gather."""
    module = fj.FunnelModel(config=_config(attention_type="factorized"))
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 16), jnp.int32)
    hlo = jax.jit(lambda p: module.apply({"params": p}, ids).last_hidden_state).lower(params)
    assert "gather" in _hlo_ops(hlo.compile().as_text())


def test_factorized_one_hot_electra_train_step_has_no_gather():
    """The whole ELECTRA pretraining step (masking, generator, sampling, discriminator,
    AdamW) of the project's train loop, not only the model: no gather, scatter or dynamic
    slice in the compiled program."""
    from funnel_jax import electra, optim, train_state
    from funnel_jax.data import SpecialIds

    config = _config(attention_type="factorized", one_hot_embeddings=True, d_model=32, n_head=4)
    special = SpecialIds(cls=2, sep=3, pad=0, mask=4, all=(0, 1, 2, 3, 4), vocab_size=64)
    objective = electra.make_objective(config, electra.ObjectiveConfig(), special, seq_len=16)
    tx = optim.make_optimizer(optim.OptimizerConfig(weight_decay=0.01, total_steps=10))
    step = train_state.make_train_step(objective.loss, tx)
    state = train_state.TrainState.create(objective.init(jax.random.PRNGKey(0)), tx, 0)
    ids = jnp.full((2, 16), 7, jnp.int32).at[:, 0].set(2)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids * 0}
    hlo = jax.jit(step).lower(state, batch).compile().as_text()
    assert not _hlo_ops(hlo), f"ELECTRA train step contains {_hlo_ops(hlo)}"
    # The check can fail: with the table lookup the same step gathers.
    plain = electra.make_objective(
        config.replace(one_hot_embeddings=False), electra.ObjectiveConfig(), special, seq_len=16
    )
    step = train_state.make_train_step(plain.loss, tx)
    hlo = jax.jit(step).lower(state, batch).compile().as_text()
    assert "gather" in _hlo_ops(hlo)
