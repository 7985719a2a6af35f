"""Config, initialisation, loading and API behaviour (the reference is run where it applies)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

import funnel_jax as fj
from funnel_jax.weights import WeightsError, params_to_state_dict
from tests.reference import jax_twin, max_abs, sample_inputs, to_torch, torch_config, torch_model

ROOT = Path(__file__).resolve().parents[1]


# --- config ---------------------------------------------------------------------------------


def test_config_from_transformers_dict_and_back():
    tconfig = transformers.FunnelConfig(
        block_sizes=[2, 3],
        block_repeats=[1, 2],
        d_model=32,
        n_head=2,
        d_head=16,
        pooling_type="max",
        attention_type="factorized",
        separate_cls=False,
        id2label={0: "neg", 1: "pos", 2: "neutral"},
        problem_type="single_label_classification",
    )
    config = fj.FunnelConfig.from_dict(tconfig.to_dict())
    for field in (
        "block_sizes",
        "block_repeats",
        "d_model",
        "n_head",
        "d_head",
        "d_inner",
        "pooling_type",
        "attention_type",
        "separate_cls",
        "truncate_seq",
        "pool_q_only",
        "layer_norm_eps",
        "initializer_range",
        "hidden_act",
        "problem_type",
        "num_labels",
    ):
        ref = getattr(tconfig, field)
        ours = getattr(config, field)
        assert (list(ours) if isinstance(ours, tuple) else ours) == ref, field
    assert dict(config.id2label) == {0: "neg", 1: "pos", 2: "neutral"}
    back = transformers.FunnelConfig(**config.to_dict())
    for field in ("block_sizes", "block_repeats", "d_model", "attention_type", "num_labels"):
        assert getattr(back, field) == getattr(tconfig, field), field
    assert back.id2label == tconfig.id2label


def test_config_json_round_trip(tmp_path):
    config = fj.FunnelConfig(block_sizes=(1, 2), d_model=8, n_head=2, d_head=4, d_inner=8)
    config.to_json_file(tmp_path / "config.json")
    assert fj.FunnelConfig.from_json_file(tmp_path / "config.json") == config
    d = json.loads((tmp_path / "config.json").read_text())
    d["some_unknown_key"] = 1
    assert fj.FunnelConfig.from_dict(d) == config


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(pooling_type="avg"), "pooling_type"),
        (dict(attention_type="flash"), "attention_type"),
        (dict(block_sizes=[]), "block_sizes"),
        (dict(block_sizes=[1, 2], block_repeats=[1]), "block_repeats"),
        (dict(d_model=0), "d_model"),
        (dict(n_head=-1), "n_head"),
        (dict(d_inner=0), "d_inner"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(hidden_act="gelu_xyz"), "hidden_act"),
        (dict(block_sizes=[2, 0]), "block_sizes"),
        (dict(layer_norm_eps=0.0), "layer_norm_eps"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"FunnelConfig.{field}"):
        fj.FunnelConfig(**kwargs)


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"d_model": 8,\n "n_head": }')
    with pytest.raises(ValueError, match=r"config.json:2"):
        fj.FunnelConfig.from_json_file(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fj.FunnelConfig.from_json_file(tmp_path / "nope.json")


RELEASED = ["small", "medium", "intermediate", "large", "xlarge"]


@pytest.mark.parametrize("name", RELEASED)
def test_released_sizes_match_reference_parameter_counts(name):
    """configs/models/<name>[-base].json: same parameter count as the reference (meta device)."""
    for suffix, cls in (("", "FunnelModel"), ("-base", "FunnelBaseModel")):
        path = ROOT / "configs" / "models" / f"{name}{suffix}.json"
        config = fj.FunnelConfig.from_json_file(path)
        assert config.architectures == (cls,)
        module = fj.MODEL_CLASSES[cls](config=config)
        ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(fj.abstract_params(module)))
        with torch.device("meta"):
            tmodel = getattr(transformers, cls)(transformers.FunnelConfig(**config.to_dict()))
        ref = sum(p.numel() for p in tmodel.parameters())
        assert ours == ref, f"{path.name}: {ours} params, reference {ref}"


# --- initialisation ------------------------------------------------------------------------


def test_initial_distributions_match_reference():
    """Each tensor's mean/std/range at init matches the reference's, tensor by tensor."""
    kw = dict(vocab_size=600, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128)
    tmodel = transformers.FunnelForMaskedLM(transformers.FunnelConfig(**kw))
    ref = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    module = fj.FunnelForMaskedLM(config=fj.FunnelConfig(**kw))
    ours = params_to_state_dict(fj.init_params(module, jax.random.PRNGKey(0)), module)
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, r in ref.items():
        if name == "lm_head.weight":
            continue
        o = ours[name]
        assert o.shape == r.shape, name
        if np.all(r == r.flat[0]):  # constants: zeros / ones
            np.testing.assert_array_equal(o, r, err_msg=name)
            continue
        if r.min() >= 0:  # uniform(0, initializer_range)
            assert o.min() >= 0 and o.max() <= kw.get("initializer_range", 0.1), name
        tol = 4.0 / np.sqrt(r.size)  # a few standard errors of the estimates
        assert abs(o.std() - r.std()) < max(tol * 2 * r.std(), 0.05 * r.std()), name
        assert abs(o.mean() - r.mean()) < 8 * r.std() / np.sqrt(r.size), name


def test_every_parameter_has_logical_axes():
    module = fj.FunnelForPreTraining(config=fj.FunnelConfig(**_tiny()))
    boxed = fj.abstract_params(module, unbox=False)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == len(leaf.value.shape)
    names = {n for leaf in leaves for n in leaf.names}
    assert {"embed", "heads", "kv", "mlp", "vocab"} <= names


def _tiny(**kw):
    d = dict(vocab_size=64, block_sizes=[1, 1, 1], d_model=16, n_head=2, d_head=8, d_inner=24)
    d.update(kw)
    return d


# --- behaviour -----------------------------------------------------------------------------


def test_jitted_forward_traces_once_per_shape():
    module = fj.FunnelModel(config=fj.FunnelConfig(**_tiny()))
    params = fj.init_params(module, jax.random.PRNGKey(0))
    traces = []

    @jax.jit
    def forward(p, ids):
        traces.append(ids.shape)
        return module.apply({"params": p}, ids).last_hidden_state

    ids = jnp.ones((2, 16), jnp.int32)
    for _ in range(3):
        forward(params, ids)
    forward(params, jnp.ones((2, 17), jnp.int32))
    assert traces == [(2, 16), (2, 17)]
    hlo = forward.lower(params, ids).as_text()
    assert "while" not in hlo  # no loop over tokens in the program


def test_dropout_uses_the_dropout_rng():
    config = fj.FunnelConfig(**_tiny(hidden_dropout=0.3, attention_dropout=0.3))
    module = fj.FunnelModel(config=config)
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.arange(32).reshape(2, 16) % 64
    det = module.apply({"params": params}, ids).last_hidden_state
    a = module.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}
    ).last_hidden_state
    b = module.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}
    ).last_hidden_state
    c = module.apply(
        {"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)}
    ).last_hidden_state
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - det))) > 1e-3
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_inputs_embeds_equal_input_ids():
    tmodel = torch_model("FunnelModel", torch_config())
    module, params = jax_twin(tmodel, "FunnelModel")
    inputs = sample_inputs(64)
    embeds = np.asarray(params["embeddings"]["word_embeddings"]["embedding"])[inputs["input_ids"]]
    a = module.apply({"params": params}, **inputs).last_hidden_state
    b = module.apply(
        {"params": params},
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        token_type_ids=inputs["token_type_ids"],
    ).last_hidden_state
    with torch.no_grad():
        ref = tmodel(
            inputs_embeds=torch.as_tensor(embeds),
            attention_mask=torch.as_tensor(inputs["attention_mask"]),
            token_type_ids=torch.as_tensor(inputs["token_type_ids"]),
        )
    assert max_abs(b, ref.last_hidden_state) < 1e-5
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    module = fj.FunnelModel(config=fj.FunnelConfig(**_tiny()))
    params = fj.init_params(module, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 16), jnp.int32)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 15\).*\(2, 16\)"):
        module.apply({"params": params}, ids, attention_mask=jnp.ones((2, 15)))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        module.apply({"params": params})
    with pytest.raises(TypeError, match="integers"):
        module.apply({"params": params}, jnp.ones((2, 16), jnp.float32))
    mc = fj.FunnelForMultipleChoice(config=module.config)
    with pytest.raises(ValueError, match=r"\[batch, choices, length\]"):
        mc.init(jax.random.PRNGKey(0), ids)


# --- from_pretrained (save_pretrained directories) -----------------------------------------


@pytest.fixture(scope="module")
def saved_mlm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mlm")
    tmodel = torch_model("FunnelForMaskedLM", torch_config(), seed=3)
    tmodel.save_pretrained(directory)
    return directory, tmodel


def test_from_pretrained_matches_reference(saved_mlm):
    directory, tmodel = saved_mlm
    assert not any("lm_head.weight" in k for k in _safetensors_keys(directory))  # tied, not saved
    module, params = fj.from_pretrained(directory)
    assert type(module).__name__ == "FunnelForMaskedLM"
    inputs = sample_inputs(64)
    with torch.no_grad():
        ref = tmodel(**to_torch(inputs)).logits
    assert max_abs(module.apply({"params": params}, **inputs).logits, ref) < 1e-5
    # Another class from the same directory: the backbone alone.
    base, base_params = fj.from_pretrained(directory, model_class="FunnelModel")
    with torch.no_grad():
        ref_hidden = tmodel.funnel(**to_torch(inputs)).last_hidden_state
    assert (
        max_abs(base.apply({"params": base_params}, **inputs).last_hidden_state, ref_hidden) < 1e-5
    )


def test_save_pretrained_loads_in_transformers(saved_mlm, tmp_path):
    directory, tmodel = saved_mlm
    module, params = fj.from_pretrained(directory)
    fj.save_pretrained(module, params, tmp_path)
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    inputs = sample_inputs(64)
    with torch.no_grad():
        assert max_abs(again(**to_torch(inputs)).logits, tmodel(**to_torch(inputs)).logits) == 0.0


def _safetensors_keys(directory):
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "model.safetensors"), framework="numpy") as f:
        return list(f.keys())


def _rewrite(directory, dst, edit):
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((Path(directory) / "config.json").read_text())
    tensors = load_file(str(Path(directory) / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_unexpected_misshaped_weights_are_named(saved_mlm, tmp_path):
    directory, _ = saved_mlm
    key = "funnel.encoder.blocks.1.0.attention.q_head.weight"

    missing = _rewrite(directory, tmp_path / "missing", lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=rf"missing from the checkpoint: {key} \(16, 16\)"):
        fj.from_pretrained(missing)

    def reshape(t):
        t[key] = np.zeros((12, 16), np.float32)

    shaped = _rewrite(directory, tmp_path / "shaped", reshape)
    with pytest.raises(
        WeightsError, match=rf"{key}: checkpoint \(12, 16\), model expects \(16, 16\)"
    ):
        fj.from_pretrained(shaped)

    def extra(t):
        t["funnel.encoder.blocks.1.0.attention.extra_bias"] = np.zeros((3,), np.float32)

    unexpected = _rewrite(directory, tmp_path / "unexpected", extra)
    with pytest.raises(WeightsError, match=r"not in the model: .*extra_bias \(3,\)"):
        fj.from_pretrained(unexpected)


def test_fresh_head_is_initialised_with_a_warning(saved_mlm, caplog):
    directory, _ = saved_mlm
    with caplog.at_level(logging.WARNING, logger="funnel_jax"):
        module, params = fj.from_pretrained(directory, model_class="FunnelForTokenClassification")
    assert "classifier/kernel" in caplog.text and "classifier/bias" in caplog.text
    flat = flatten_dict(params)
    assert ("classifier", "kernel") in flat
    assert float(jnp.std(flat[("classifier", "kernel")])) > 0
