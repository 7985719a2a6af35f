"""Numerical parity with the `transformers` PyTorch reference, run side by side in each test.

Float32 outputs, hidden states and attention maps must agree within 1e-5 max-abs; losses too;
and the gradient of every head's loss with respect to every parameter must agree with torch
autograd.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.reference import (
    jax_grads_as_torch,
    jax_twin,
    max_abs,
    sample_inputs,
    to_torch,
    torch_config,
    torch_grads,
    torch_model,
)

ATOL = 1e-5
# Worst errors seen, printed at the end of the session (pytest -s) and quoted in the README.
WORST: dict[str, float] = {}


def _record(kind: str, err: float) -> None:
    WORST[kind] = max(WORST.get(kind, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    print("\nworst max-abs errors vs transformers:", {k: f"{v:.2e}" for k, v in WORST.items()})


# A covering grid: every option on and off, 2 to 4 blocks, repeats, activations.
GRID = {
    "default": {},
    "factorized": dict(attention_type="factorized"),
    "max_factorized_poolqkv": dict(
        pooling_type="max", attention_type="factorized", pool_q_only=False
    ),
    "no_separate_cls": dict(separate_cls=False),
    "no_truncate": dict(truncate_seq=False),
    "pool_qkv": dict(pool_q_only=False),
    "repeats": dict(block_sizes=[1, 2, 1], block_repeats=[1, 2, 2]),
    "two_blocks_factorized_no_truncate": dict(
        block_sizes=[1, 2], attention_type="factorized", truncate_seq=False
    ),
    "four_blocks_max": dict(block_sizes=[1, 1, 1, 1], pooling_type="max"),
    "four_blocks_factorized_no_cls": dict(
        block_sizes=[1, 1, 1, 1],
        block_repeats=[2, 1, 1, 1],
        attention_type="factorized",
        separate_cls=False,
    ),
    "first_block_repeats_gelu": dict(
        block_sizes=[2, 1, 1], block_repeats=[2, 1, 1], hidden_act="gelu"
    ),
    "relu_no_cls_poolqkv": dict(hidden_act="relu", separate_cls=False, pool_q_only=False),
    "silu_three_decoder_layers": dict(
        hidden_act="silu", num_decoder_layers=3, block_sizes=[1, 1, 1]
    ),
    # Implementation options of this project: the maths must not change.
    "fused_bias_attention": dict(attention_impl="fused_bias"),
    "fused_bias_factorized_one_hot": dict(
        attention_impl="fused_bias", attention_type="factorized", one_hot_embeddings=True
    ),
    "remat_dots": dict(remat_policy="dots"),
    "scan_layers": dict(scan_layers=True, block_sizes=[3, 2, 2]),
    "scan_layers_repeats_factorized_remat": dict(
        scan_layers=True,
        block_sizes=[2, 1, 2],
        block_repeats=[1, 3, 2],
        attention_type="factorized",
        remat_policy="full",
    ),
}


def _compare_backbone(class_name, overrides, seq_len):
    tconfig = torch_config(**overrides)
    tmodel = torch_model(class_name, tconfig)
    module, params = jax_twin(tmodel, class_name)
    inputs = sample_inputs(tconfig.vocab_size, seq_len=seq_len)
    with torch.no_grad():
        ref = tmodel(**to_torch(inputs), output_hidden_states=True, output_attentions=True)
    out = module.apply(
        {"params": params}, **inputs, output_hidden_states=True, output_attentions=True
    )
    assert len(out.hidden_states) == len(ref.hidden_states)
    assert len(out.attentions) == len(ref.attentions)
    errs = [max_abs(out.last_hidden_state, ref.last_hidden_state)]
    errs += [max_abs(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True)]
    attn_errs = [max_abs(a, b) for a, b in zip(out.attentions, ref.attentions, strict=True)]
    _record("hidden states", max(errs))
    _record("attention maps", max(attn_errs))
    assert max(errs) < ATOL, f"hidden-state errors {errs}"
    assert max(attn_errs) < ATOL, f"attention-map errors {attn_errs}"


@pytest.mark.parametrize("name", list(GRID))
@pytest.mark.parametrize("seq_len", [13, 16])
def test_funnel_model_matches_reference(name, seq_len):
    _compare_backbone("FunnelModel", GRID[name], seq_len)


@pytest.mark.parametrize("name", ["default", "factorized", "no_separate_cls", "repeats"])
def test_funnel_base_model_matches_reference(name):
    _compare_backbone("FunnelBaseModel", GRID[name], 15)


def test_minimum_length_works_and_shorter_fails():
    """At the minimum length every block pools and we match; one below raises ValueError."""
    overrides = dict(block_sizes=[1, 1, 1])
    module, _ = jax_twin(torch_model("FunnelModel", torch_config(**overrides)), "FunnelModel")
    minimum = module.config.min_seq_len()
    _compare_backbone("FunnelModel", overrides, minimum)
    with pytest.raises(ValueError, match=f"minimum length is {minimum}"):
        module.init(jax.random.PRNGKey(0), jnp.zeros((1, minimum - 1), jnp.int32))


# --- every head: outputs, loss, gradients ------------------------------------------------------


def _labels(class_name, config, inputs, problem_type=None, rng=None):
    rng = rng or np.random.RandomState(1)
    b, length = inputs["input_ids"].shape[:2]
    if class_name == "FunnelForPreTraining":
        return dict(labels=rng.randint(0, 2, (b, length)))
    if class_name == "FunnelForMaskedLM":
        labels = rng.randint(0, config.vocab_size, (b, length))
        labels[rng.rand(b, length) < 0.5] = -100
        return dict(labels=labels)
    if class_name == "FunnelForTokenClassification":
        labels = rng.randint(0, config.num_labels, (b, length))
        labels[:, 0] = -100
        return dict(labels=labels)
    if class_name == "FunnelForQuestionAnswering":
        # One position past the end: clamped and ignored, as in the reference.
        return dict(start_positions=np.array([1, 3, length + 5]), end_positions=np.array([2, 5, 4]))
    if class_name == "FunnelForMultipleChoice":
        return dict(labels=rng.randint(0, inputs["input_ids"].shape[1], (b,)))
    if class_name == "FunnelForSequenceClassification":
        if problem_type == "regression":
            return dict(labels=rng.randn(b).astype(np.float32))
        if problem_type == "multi_label_classification":
            return dict(labels=rng.randint(0, 2, (b, config.num_labels)).astype(np.float32))
        return dict(labels=rng.randint(0, config.num_labels, (b,)))
    raise AssertionError(class_name)


HEADS = [
    ("FunnelForPreTraining", {}, None),
    ("FunnelForMaskedLM", {}, None),
    ("FunnelForSequenceClassification", dict(num_labels=3), None),
    ("FunnelForSequenceClassification", dict(num_labels=1), "regression"),
    ("FunnelForSequenceClassification", dict(num_labels=4), "multi_label_classification"),
    ("FunnelForMultipleChoice", dict(attention_type="factorized"), None),
    ("FunnelForTokenClassification", dict(num_labels=5, pool_q_only=False), None),
    ("FunnelForQuestionAnswering", dict(separate_cls=False), None),
    ("FunnelModel", {}, None),  # gradient of a scalar of the output, no loss of its own
    ("FunnelBaseModel", dict(block_repeats=[1, 2, 1]), None),
    # Implementation options, gradients included.
    ("FunnelForPreTraining", dict(remat_policy="full", attention_impl="fused_bias"), None),
    ("FunnelForMaskedLM", dict(remat_policy="attention_scores", one_hot_embeddings=True), None),
    ("FunnelForSequenceClassification", dict(remat_policy="dots_no_batch"), None),
    ("FunnelForPreTraining", dict(scan_layers=True, block_sizes=[3, 2, 2]), None),
    (  # what configs/models/large.json ships
        "FunnelForPreTraining",
        dict(
            scan_layers=True,
            remat_policy="dots_no_batch_probs",
            dropout_rng="hash",
            block_sizes=[3, 2, 2],
        ),
        None,
    ),
    (
        "FunnelForTokenClassification",
        dict(scan_layers=True, remat_policy="dots", block_repeats=[2, 1, 2]),
        None,
    ),
]


def _head_inputs(class_name, vocab_size):
    if class_name == "FunnelForMultipleChoice":
        parts = [sample_inputs(vocab_size, seq_len=12, seed=s) for s in range(2)]
        return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}
    return sample_inputs(vocab_size, seq_len=14)


def _output_arrays(out):
    names = ("logits", "start_logits", "end_logits", "last_hidden_state")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


@pytest.mark.parametrize(
    "class_name,overrides,problem_type", HEADS, ids=[f"{c}-{p or ''}" for c, _, p in HEADS]
)
def test_head_outputs_loss_and_gradients_match_reference(class_name, overrides, problem_type):
    if problem_type:
        overrides = dict(overrides, problem_type=problem_type)
    tconfig = torch_config(**overrides)
    tmodel = torch_model(class_name, tconfig)
    module, params = jax_twin(tmodel, class_name)
    inputs = _head_inputs(class_name, tconfig.vocab_size)
    has_loss = class_name not in ("FunnelModel", "FunnelBaseModel")
    labels = _labels(class_name, tconfig, inputs, problem_type) if has_loss else {}

    # Reference: outputs, loss and autograd gradients.
    tmodel.zero_grad()
    ref = tmodel(
        **to_torch(inputs), **to_torch(labels), output_hidden_states=True, output_attentions=True
    )
    if has_loss:
        ref_loss = ref.loss
    else:  # a fixed random projection of the output makes a scalar to differentiate
        weights = torch.as_tensor(np.random.RandomState(2).randn(*ref.last_hidden_state.shape))
        ref_loss = (ref.last_hidden_state.double() * weights).sum()
    ref_loss.backward()
    ref_grads = torch_grads(tmodel)

    def loss_fn(p):
        out = module.apply(
            {"params": p}, **inputs, **labels, output_hidden_states=True, output_attentions=True
        )
        if has_loss:
            return out.loss, out
        w = jnp.asarray(np.random.RandomState(2).randn(*out.last_hidden_state.shape), jnp.float32)
        return jnp.sum(out.last_hidden_state * w), out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    for name, value in _output_arrays(out).items():
        err = max_abs(value, getattr(ref, name))
        _record("head outputs", err)
        assert err < ATOL, f"{name}: max-abs {err}"
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert max_abs(a, b) < ATOL
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert max_abs(a, b) < ATOL
    loss_err = abs(float(loss) - float(ref_loss.detach()))
    ref_scale = max(1.0, abs(float(ref_loss.detach())))
    _record("losses (relative to max(1, |loss|))", loss_err / ref_scale)
    assert loss_err < ATOL * ref_scale

    ours = jax_grads_as_torch(grads, module)
    assert set(ours) == {n for n, _ in tmodel.named_parameters()}, "parameter names differ"
    missing = sorted(set(ref_grads) - set(ours))
    assert not missing, f"no gradient for {missing}"
    worst = 0.0
    for name, g in ref_grads.items():
        scale = max(1.0, float(np.abs(g).max()))
        err = max_abs(ours[name], g) / scale
        worst = max(worst, err)
        assert err < ATOL, f"gradient of {name}: max-abs {err * scale} (scale {scale})"
    _record("gradients (relative to max(1, |g|max))", worst)


# --- dtypes ------------------------------------------------------------------------------------


def test_bfloat16_forward_stays_close_to_float32():
    """bf16 compute runs and stays within a stated gap of float32 (positions stay float32)."""
    tconfig = torch_config(d_model=32, n_head=4, d_inner=64)
    tmodel = torch_model("FunnelModel", tconfig)
    module32, params = jax_twin(tmodel, "FunnelModel")
    module16 = type(module32)(config=module32.config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    inputs = sample_inputs(tconfig.vocab_size, seq_len=32)
    out32 = module32.apply({"params": params}, **inputs).last_hidden_state
    out16 = module16.apply({"params": params}, **inputs).last_hidden_state
    assert out16.dtype == jnp.bfloat16
    gap = float(jnp.max(jnp.abs(out16.astype(jnp.float32) - out32)))
    rel = gap / float(jnp.max(jnp.abs(out32)))
    _record("bf16 vs f32 (max-abs, layer-normed outputs)", gap)
    assert np.isfinite(gap)
    # bf16 has an 8-bit mantissa (relative step 2**-8 = 0.4%); a few roundings per layer.
    assert rel < 0.05, f"bf16 gap {gap} (relative {rel})"


def test_bfloat16_params_and_compute():
    tmodel = torch_model("FunnelForMaskedLM", torch_config())
    module, params = jax_twin(tmodel, "FunnelForMaskedLM")
    bf16 = type(module)(config=module.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    inputs = sample_inputs(module.config.vocab_size)
    logits = bf16.apply({"params": p16}, **inputs).logits
    ref = module.apply({"params": params}, **inputs).logits
    assert logits.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref))) < 0.1 * float(
        jnp.max(jnp.abs(ref))
    )
