"""Checkpoints: transformers <-> Orbax conversion, cross-class loading, training checkpoints.

Every comparison is against the PyTorch reference (`transformers`) run in the same test, on
random weights (perturbed so that no bias or LayerNorm parameter keeps its initial value).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

import funnel_jax  # noqa: E402
from convert import check_parity, orbax_to_torch, torch_to_orbax  # noqa: E402
from funnel_jax import checkpoint  # noqa: E402
from funnel_jax.checkpoint import CheckpointMismatchError, TrainCheckpointer  # noqa: E402
from funnel_jax.models import MODEL_CLASSES  # noqa: E402

CLASSES = sorted(MODEL_CLASSES)
TINY = dict(
    vocab_size=64,
    block_sizes=[1, 1, 2],
    d_model=16,
    n_head=2,
    d_head=8,
    d_inner=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
)
ATOL = 1e-5
VOCAB = ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>"] + [f"w{i}" for i in range(59)]


# --- helpers -------------------------------------------------------------------------------


def torch_model(cls_name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.FunnelConfig(**{**TINY, **overrides})
    model = getattr(transformers, cls_name)(cfg).eval()
    with torch.no_grad():  # move every parameter off its initial value (biases are 0, LN 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def sample_inputs(cls_name: str):
    rs = np.random.RandomState(1)
    ids = rs.randint(5, 64, size=(2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0
    types = np.zeros((2, 12), np.int64)
    types[:, 6:] = 1
    types[:, 0] = 2
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if cls_name == "FunnelForMultipleChoice":  # one question, two choices: [1, 2, 12]
        inputs = {k: v[None] for k, v in inputs.items()}
    return inputs


def outputs_of(out) -> dict[str, np.ndarray]:
    res = {}
    for name in ("logits", "start_logits", "end_logits", "last_hidden_state"):
        v = getattr(out, name, None)
        if v is not None:
            res[name] = v
    for group in ("hidden_states", "attentions"):
        for i, v in enumerate(getattr(out, group, None) or ()):
            res[f"{group}[{i}]"] = v
    return {
        k: (v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in res.items()
    }


def run_torch(model, inputs):
    with torch.no_grad():
        out = model(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
            output_hidden_states=True,
            output_attentions=True,
        )
    return outputs_of(out)


def run_flax(module, params, inputs):
    out = module.apply(
        {"params": params},
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        token_type_ids=inputs["token_type_ids"],
        output_hidden_states=True,
        output_attentions=True,
    )
    return outputs_of(out)


def assert_same_outputs(ref: dict, got: dict, atol=ATOL):
    assert sorted(ref) == sorted(got)
    for name in ref:
        assert ref[name].shape == got[name].shape, name
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=atol, err_msg=name)


def write_bin(model, directory: Path, shards: int = 1) -> Path:
    """pytorch_model.bin (torch.save of the state dict, tied lm_head.weight included), or a
    sharded set with pytorch_model.bin.index.json."""
    directory.mkdir(parents=True)
    model.config.to_json_file(directory / "config.json")
    sd = model.state_dict()
    if shards == 1:
        torch.save(sd, directory / "pytorch_model.bin")
        return directory
    keys = list(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    with open(directory / "pytorch_model.bin.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


def convert(src, dst, *args) -> int:
    return torch_to_orbax.main([str(src), str(dst), "--no-progress", *args])


def no_leftovers(dst: Path):
    """DST absent and no temporary sibling left behind."""
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


def flat(tree):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(tree)}


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def refs(work):
    """For each class: the torch model and its safetensors, .bin and sharded directories."""
    out = {}
    for name in CLASSES:
        model = torch_model(name, seed=CLASSES.index(name))
        base = work / name
        model.save_pretrained(base / "safetensors")
        (base / "safetensors" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
        write_bin(model, base / "bin")
        model.save_pretrained(base / "sharded", max_shard_size="8KB")
        out[name] = (model, base)
    return out


@pytest.fixture(scope="module")
def converted(refs, work):
    """Each class's safetensors directory converted to Orbax (reused by several tests)."""
    out = {}
    for name, (_, base) in refs.items():
        dst = work / "orbax" / name
        assert convert(base / "safetensors", dst) == 0
        out[name] = dst
    return out


# --- transformers -> Orbax -> funnel-jax -----------------------------------------------------


@pytest.mark.parametrize("cls_name", CLASSES)
def test_converted_outputs_match_reference(cls_name, refs, converted, work):
    model, base = refs[cls_name]
    inputs = sample_inputs(cls_name)
    ref = run_torch(model, inputs)

    dst = converted[cls_name]
    assert checkpoint.is_orbax_model_dir(dst)
    assert (dst / "vocab.txt").read_bytes() == (base / "safetensors" / "vocab.txt").read_bytes()
    module, params = funnel_jax.from_pretrained(dst)
    assert type(module).__name__ == cls_name
    assert_same_outputs(ref, run_flax(module, params, inputs))

    # The .bin and the sharded set give the same params, bit for bit, hence the same outputs.
    for fmt in ("bin", "sharded"):
        other = work / f"orbax-{fmt}" / cls_name
        assert convert(base / fmt, other) == 0, fmt
        _, other_params = funnel_jax.from_pretrained(other)
        a, b = flat(params), flat(other_params)
        assert sorted(a) == sorted(b), fmt
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{fmt}: {k}")
    assert_same_outputs(ref, run_flax(module, other_params, inputs))


def test_sharded_bin(refs, work):
    model, _ = refs["FunnelForQuestionAnswering"]
    src = write_bin(model, work / "sharded-bin", shards=3)
    dst = work / "sharded-bin-orbax"
    assert convert(src, dst) == 0
    inputs = sample_inputs("FunnelForQuestionAnswering")
    module, params = funnel_jax.from_pretrained(dst)
    assert_same_outputs(run_torch(model, inputs), run_flax(module, params, inputs))


def test_single_file_with_config(refs, work):
    model, base = refs["FunnelModel"]
    folder = work / "single"
    folder.mkdir()
    shutil.copy(base / "bin" / "pytorch_model.bin", folder / "weights.pt")
    dst = work / "single-orbax"
    assert convert(folder / "weights.pt", dst, "--config", str(base / "bin" / "config.json")) == 0
    inputs = sample_inputs("FunnelModel")
    module, params = funnel_jax.from_pretrained(dst)
    assert_same_outputs(run_torch(model, inputs), run_flax(module, params, inputs))


def test_bfloat16_storage(refs, converted, work):
    model, base = refs["FunnelForPreTraining"]
    dst = work / "bf16"
    assert convert(base / "safetensors", dst, "--dtype", "bfloat16") == 0
    module, params = funnel_jax.from_pretrained(dst)
    leaves = jax.tree.leaves(params)
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    ref = {k: v.numpy().astype(jnp.bfloat16) for k, v in model.state_dict().items()}
    got = funnel_jax.weights.params_to_state_dict(params, module)
    for k, v in got.items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    # Cast on load: float32 params from a bf16 directory, and bf16 from a float32 one.
    _, p32 = funnel_jax.from_pretrained(dst, dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(p32)} == {jnp.dtype(jnp.float32)}
    _, p16 = funnel_jax.from_pretrained(converted["FunnelForPreTraining"], dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


# --- Orbax -> transformers ------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", CLASSES)
def test_round_trip_to_transformers(cls_name, refs, converted, work):
    model, base = refs[cls_name]
    back = work / "back" / cls_name
    assert orbax_to_torch.main([str(converted[cls_name]), str(back)]) == 0
    assert (back / "vocab.txt").exists()
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == "funnel" and cfg["architectures"] == [cls_name]

    original = load_file(str(base / "safetensors" / "model.safetensors"))
    written = load_file(str(back / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for k in original:
        assert written[k].dtype == original[k].dtype, k
        np.testing.assert_array_equal(written[k], original[k], err_msg=k)

    inputs = sample_inputs(cls_name)
    reloaded, info = getattr(transformers, cls_name).from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    # Both sides loaded by transformers from files: the freshly built in-memory model can differ
    # from any loaded copy of its own weights by an ulp (torch's kernels, not the weights).
    original_model = getattr(transformers, cls_name).from_pretrained(base / "safetensors").eval()
    ref = run_torch(original_model, inputs)
    got = run_torch(reloaded.eval(), inputs)
    assert_same_outputs(ref, got, atol=0)

    auto = transformers.AutoModel.from_pretrained(back)
    assert type(auto).__name__ in ("FunnelModel", "FunnelBaseModel")
    emb = auto.embeddings.word_embeddings.weight.detach().numpy()
    np.testing.assert_array_equal(emb, model.get_input_embeddings().weight.detach().numpy())


def test_masked_lm_tying(refs, converted, work):
    model, base = refs["FunnelForMaskedLM"]
    _, params = funnel_jax.from_pretrained(converted["FunnelForMaskedLM"])
    assert set(params["lm_head"]) == {"bias"}  # the projection is the word embedding
    # The .bin holds lm_head.weight (tied, equal to the embedding): it is accepted and unused.
    assert "lm_head.weight" in torch.load(base / "bin" / "pytorch_model.bin", weights_only=True)
    back = work / "back" / "FunnelForMaskedLM"
    if not back.exists():
        assert orbax_to_torch.main([str(converted["FunnelForMaskedLM"]), str(back)]) == 0
    assert "lm_head.weight" not in load_file(str(back / "model.safetensors"))
    reloaded = transformers.FunnelForMaskedLM.from_pretrained(back)
    assert torch.equal(reloaded.lm_head.weight, reloaded.funnel.embeddings.word_embeddings.weight)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


# --- cross-class loading --------------------------------------------------------------------


def test_pretraining_to_model_strips_head(refs, converted, work):
    model, base = refs["FunnelForPreTraining"]
    inputs = sample_inputs("FunnelModel")
    ref = run_torch(model.funnel, inputs)
    # Through the converter, and through from_pretrained of the Orbax directory.
    dst = work / "pretrain-as-model"
    assert convert(base / "safetensors", dst, "--model-class", "FunnelModel") == 0
    for path in (dst, converted["FunnelForPreTraining"]):
        module, params = funnel_jax.from_pretrained(path, model_class="FunnelModel")
        assert type(module).__name__ == "FunnelModel"
        assert "discriminator_predictions" not in params and "funnel" not in params
        assert_same_outputs(ref, run_flax(module, params, inputs))


def test_model_to_base_model_drops_decoder(refs, converted):
    _, base = refs["FunnelModel"]
    reference = transformers.FunnelBaseModel.from_pretrained(base / "safetensors").eval()
    inputs = sample_inputs("FunnelBaseModel")
    module, params = funnel_jax.from_pretrained(
        converted["FunnelModel"], model_class="FunnelBaseModel"
    )
    assert "decoder" not in params
    assert_same_outputs(run_torch(reference, inputs), run_flax(module, params, inputs))


def test_model_to_classifier_inits_head_with_warning(refs, converted, work, caplog):
    model, base = refs["FunnelModel"]
    reference = transformers.FunnelBaseModel.from_pretrained(base / "safetensors").eval()
    inputs = sample_inputs("FunnelForSequenceClassification")
    expected_new = [
        "classifier/linear_hidden/kernel",
        "classifier/linear_hidden/bias",
        "classifier/linear_out/kernel",
        "classifier/linear_out/bias",
    ]
    dst = work / "model-as-classifier"
    with caplog.at_level(logging.WARNING, logger="funnel_jax"):
        assert (
            convert(base / "safetensors", dst, "--model-class", "FunnelForSequenceClassification")
            == 0
        )
    assert all(name in caplog.text for name in expected_new), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="funnel_jax"):
        module, params = funnel_jax.from_pretrained(
            converted["FunnelModel"], model_class="FunnelForSequenceClassification"
        )
    assert all(name in caplog.text for name in expected_new), caplog.text
    assert "embeddings" not in caplog.text and "encoder" not in caplog.text
    # The backbone is the checkpoint's: its hidden states are the reference base model's.
    out = run_flax(module, params, inputs)
    ref = run_torch(reference, inputs)
    for k in ref:
        if k.startswith(("hidden_states", "attentions")):
            np.testing.assert_allclose(out[k], ref[k], rtol=0, atol=ATOL, err_msg=k)
    assert out["logits"].shape == (2, 2)


def test_orbax_dir_mismatch_names_tensor(converted):
    """Cross-class loading of an Orbax directory into a head of another shape is refused."""
    with pytest.raises(funnel_jax.weights.WeightsError) as e:
        funnel_jax.from_pretrained(
            converted["FunnelForSequenceClassification"], model_class="FunnelForMultipleChoice"
        )
    msg = str(e.value)
    assert "classifier.linear_out.weight" in msg and "(2, 16)" in msg and "(1, 16)" in msg


# --- errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(refs):
    return refs["FunnelModel"][1] / "safetensors"


def broken_copy(model_dir: Path, tmp: Path, edit=None, config_edit=None) -> Path:
    dst = tmp / "src"
    shutil.copytree(model_dir, dst)
    if edit is not None:
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config_edit is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def expect_error(src, tmp_path, capsys, *needles, args=()):
    dst = tmp_path / "out"
    assert convert(src, dst, *args) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, (needle, err)
    no_leftovers(dst)
    return err


def test_error_missing_tensor(model_dir, tmp_path, capsys):
    key = "encoder.blocks.1.0.attention.k_head.weight"
    src = broken_copy(model_dir, tmp_path, edit=lambda sd: sd.pop(key))
    expect_error(src, tmp_path, capsys, "missing", key, "(16, 16)")


def test_error_unexpected_tensor(model_dir, tmp_path, capsys):
    key = "encoder.blocks.0.0.attention.extra_bias"

    def edit(sd):
        sd[key] = np.zeros((3,), np.float32)

    src = broken_copy(model_dir, tmp_path, edit=edit)
    expect_error(src, tmp_path, capsys, "not in the model", key, "(3,)")


def test_error_wrong_shape(model_dir, tmp_path, capsys):
    key = "encoder.blocks.2.1.ffn.linear_2.bias"

    def edit(sd):
        sd[key] = np.zeros((17,), np.float32)

    src = broken_copy(model_dir, tmp_path, edit=edit)
    expect_error(src, tmp_path, capsys, key, "(17,)", "(16,)")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_error_truncated_file(refs, fmt, tmp_path, capsys):
    base = refs["FunnelModel"][1]
    src = tmp_path / "src"
    shutil.copytree(base / fmt, src)
    name = "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"
    data = (src / name).read_bytes()
    (src / name).write_bytes(data[: len(data) // 2])
    expect_error(src, tmp_path, capsys, str(src / name), "truncated")


def test_error_missing_shard(refs, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(refs["FunnelModel"][1] / "sharded", src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    expect_error(src, tmp_path, capsys, str(shard), "not found")


@pytest.mark.parametrize(
    "change, needles",
    [
        ({"d_model": 32}, ["d_model = 32", "embeddings.word_embeddings.weight", "(64, 16)"]),
        ({"vocab_size": 100}, ["vocab_size = 100", "(64, 16)"]),
        ({"n_head": 4}, ["n_head * d_head = 4 * 8 = 32", "q_head.weight", "(16, 16)"]),
        ({"d_inner": 64}, ["d_inner = 64", "ffn.linear_1.weight", "(32, 16)"]),
        ({"block_sizes": [1, 2, 2]}, ["block_sizes[1] = 2", "1 layers in block 1"]),
        ({"block_sizes": [1, 1], "block_repeats": [1, 1]}, ["names 2 blocks", "have 3"]),
        ({"num_decoder_layers": 1}, ["num_decoder_layers = 1", "have 2"]),
    ],
)
def test_error_config_mismatch(model_dir, tmp_path, capsys, change, needles):
    src = broken_copy(model_dir, tmp_path, config_edit=change)
    expect_error(src, tmp_path, capsys, "config does not match", *needles)


def test_error_num_labels(refs, tmp_path, capsys):
    src = broken_copy(
        refs["FunnelForSequenceClassification"][1] / "safetensors",
        tmp_path,
        config_edit={"num_labels": 5, "id2label": None, "label2id": None},
    )
    expect_error(src, tmp_path, capsys, "num_labels = 5", "classifier.linear_out.weight")


def test_destination_not_overwritten(model_dir, tmp_path, capsys):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert(model_dir, dst) == 1
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert convert(model_dir, dst, "--overwrite") == 0
    assert checkpoint.is_orbax_model_dir(dst) and not (dst / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_failure_mid_write_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    """A failure while Orbax writes: no DST, no temporary sibling; an old DST survives."""
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.FunnelConfig, "to_json_file", boom)
    dst = tmp_path / "out"
    assert convert(model_dir, dst) == 1
    assert calls and "disk full" in capsys.readouterr().err
    no_leftovers(dst)
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    assert convert(model_dir, dst, "--overwrite") == 1
    assert (dst / "old.txt").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# --- check_parity ---------------------------------------------------------------------------


def test_check_parity(refs, capsys):
    src = refs["FunnelForMaskedLM"][1] / "safetensors"
    assert check_parity.main([str(src)]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "hidden_states[7]" in out and "attentions[5]" in out
    assert "OK: worst" in out
    # Text through the tokenizer stored beside the weights; an impossible tolerance fails.
    args = [str(src), "--text", "w1 w2 w3 w4", "--text-pair", "w5 w6", "--atol", "-1"]
    assert check_parity.main(args) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "logits" in out


# --- training checkpoints ---------------------------------------------------------------------


def train_state(seed=0):
    k = jax.random.PRNGKey(seed)
    params = {
        "dense": {"kernel": jax.random.normal(k, (3, 4)), "bias": jnp.arange(4.0)},
        "emb": jax.random.normal(k, (5, 2)).astype(jnp.bfloat16),
    }
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "rng": jax.random.PRNGKey(seed + 1),
    }


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_checkpoint_round_trip(tmp_path):
    state = train_state()
    extra = {"data": {"epoch": 1, "offset": 1234}, "loss": np.float32(2.5), "tag": "run"}
    ckpt = TrainCheckpointer(tmp_path / "run")
    assert ckpt.latest_step() is None
    assert ckpt.save(100, state, extra)
    ckpt.close()

    ckpt = TrainCheckpointer(tmp_path / "run")  # a fresh process, as on resumption
    assert ckpt.latest_step() == 100
    abstract = jax.eval_shape(lambda: state)
    restored, got_extra = ckpt.restore(None, abstract)
    assert_trees_equal(restored, state)
    assert isinstance(restored["params"]["dense"]["kernel"], jax.Array)
    assert got_extra == {"data": {"epoch": 1, "offset": 1234}, "loss": 2.5, "tag": "run"}
    # Arrays as the target: restored onto their shardings; dtypes cast on request.
    restored2, _ = ckpt.restore(100, state)
    assert_trees_equal(restored2, state)
    abstract32 = dict(abstract)
    abstract32["params"] = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), abstract["params"]
    )
    restored3, _ = ckpt.restore(100, abstract32)
    assert restored3["params"]["emb"].dtype == jnp.float32
    assert not ckpt.save(100, state)  # an existing step is never overwritten
    ckpt.close()


def test_train_checkpoint_keeps_newest(tmp_path):
    ckpt = TrainCheckpointer(tmp_path / "run", keep=2)
    for step in (1, 2, 3, 4):
        assert ckpt.save(step, train_state(step), {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit()) == ["3", "4"]
    state, extra = ckpt.restore(3, jax.eval_shape(lambda: train_state()))
    assert extra == {"step": 3}
    assert_trees_equal(state, train_state(3))
    ckpt.close()


def test_train_checkpoint_interval_and_async(tmp_path):
    ckpt = TrainCheckpointer(tmp_path / "run", keep=None, save_interval_steps=5, async_save=True)
    saved = [s for s in range(1, 12) if ckpt.save(s, train_state(), {"s": s}, force=False)]
    assert saved == [5, 10]
    assert ckpt.save(11, train_state(11), {"s": 11})  # force=True (default) always saves
    ckpt.wait()
    assert ckpt.all_steps() == [5, 10, 11]
    state, extra = ckpt.restore(None, jax.eval_shape(lambda: train_state()))
    assert extra == {"s": 11}
    assert_trees_equal(state, train_state(11))
    ckpt.close()


def test_train_checkpoint_ignores_incomplete(tmp_path):
    run = tmp_path / "run"
    ckpt = TrainCheckpointer(run)
    ckpt.save(10, train_state(), {"ok": True})
    ckpt.close()
    # A save killed mid-write leaves Orbax's temporary directory behind.
    tmp = run / "20.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    ckpt = TrainCheckpointer(run)
    assert ckpt.latest_step() == 10 and ckpt.all_steps() == [10]
    state, extra = ckpt.restore(None, jax.eval_shape(lambda: train_state()))
    assert extra == {"ok": True}
    with pytest.raises(FileNotFoundError, match="step 20"):
        ckpt.restore(20, jax.eval_shape(lambda: train_state()))
    # Saving goes on past it.
    assert ckpt.save(20, train_state(), {"ok": 2})
    assert ckpt.latest_step() == 20
    ckpt.close()


def test_train_checkpoint_mismatch_names_params(tmp_path):
    ckpt = TrainCheckpointer(tmp_path / "run")
    ckpt.save(1, train_state())
    abstract = jax.eval_shape(lambda: train_state())
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((3, 5), jnp.float32)
    abstract["params"]["extra"] = jax.ShapeDtypeStruct((2,), jnp.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore(1, abstract)
    msg = str(e.value)
    assert "params/dense/kernel: checkpoint (3, 4) vs abstract state (3, 5)" in msg
    assert "params/extra (2,)" in msg
    del abstract["params"]["extra"], abstract["params"]["emb"]
    abstract["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    with pytest.raises(CheckpointMismatchError, match=r"not in the abstract state: params/emb"):
        ckpt.restore(1, abstract)
    with pytest.raises(FileNotFoundError):
        TrainCheckpointer(tmp_path / "empty").restore(None, abstract)
    ckpt.close()


def test_save_model_dir_checks_params(tmp_path, converted):
    module, params = funnel_jax.from_pretrained(converted["FunnelBaseModel"])
    params = jax.tree.map(lambda x: x, params)
    params["embeddings"]["word_embeddings"]["embedding"] = jnp.zeros((65, 16))
    with pytest.raises(CheckpointMismatchError, match=r"\(64, 16\) vs params \(65, 16\)"):
        checkpoint.save_model_dir(tmp_path / "m", module, params)
    no_leftovers(tmp_path / "m")
