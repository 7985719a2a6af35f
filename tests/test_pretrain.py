"""Pretraining: data pipeline, masking, optimizer, train step, ELECTRA objective, and the
experiments.pretrain entry point (short runs, learning, bit-identical resume).

Expected values are derived independently of the code under test: from the definition of the
recipe (rates, layouts, schedules), from brute-force computations, or from a second run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from funnel_jax import data
from funnel_jax.config import FunnelConfig
from funnel_jax.electra import (
    ElectraObjective,
    MlmObjective,
    ObjectiveConfig,
    generator_config,
    mask_tokens,
    roc_auc,
)
from funnel_jax.models import (
    FunnelBaseModel,
    FunnelForMaskedLM,
    FunnelForPreTraining,
    abstract_params,
)
from funnel_jax.optim import (
    OptimizerConfig,
    layerwise_lr_scales,
    learning_rate_schedule,
    make_optimizer,
    weight_decay_mask,
)
from funnel_jax.train_state import TrainState, jit_train_step, make_train_step

SPECIAL = data.SpecialIds(cls=2, sep=3, pad=0, mask=4, all=(0, 1, 2, 3, 4, 5, 6), vocab_size=1000)


# --------------------------------------------------------------------------- masking


def _synthetic_batch(rng, batch=128, length=128, vocab=1000):
    ids = rng.integers(7, vocab, size=(batch, length)).astype(np.int32)
    am = np.ones((batch, length), np.int32)
    for r in range(batch):
        n = int(rng.integers(length // 2, length + 1))
        ids[r, 0] = SPECIAL.cls
        ids[r, n // 2] = SPECIAL.sep
        ids[r, n - 1] = SPECIAL.sep
        ids[r, n:] = SPECIAL.pad
        am[r, n:] = 0
        ids[r, 5] = 1  # an <unk>: special, never a target
    return ids, am


def test_masking_rates_and_specials():
    ids, am = _synthetic_batch(np.random.default_rng(0))
    num_predict = math.ceil(0.15 * ids.shape[1])
    out = jax.jit(
        lambda r, i, a: mask_tokens(
            r,
            i,
            a,
            special_ids=np.arange(7),
            vocab_size=1000,
            mask_id=SPECIAL.mask,
            mask_prob=0.15,
            mask_token_prob=0.8,
            random_token_prob=0.1,
            num_predict=num_predict,
        )
    )(jax.random.PRNGKey(0), ids, am)
    out = jax.device_get(out)
    masked, is_target = out["masked_ids"], out["is_target"]
    special = np.isin(ids, np.arange(7))
    candidate = (am == 1) & ~special
    # Specials and padding are never targets; nothing but targets changes.
    assert not np.any(is_target & ~candidate)
    assert np.array_equal(masked[~is_target], ids[~is_target])
    # About 15% of the candidates are targets (per row and overall).
    frac = is_target.sum() / candidate.sum()
    assert 0.14 < frac < 0.16, frac
    per_row = is_target.sum(1) / candidate.sum(1)
    assert np.all(np.abs(per_row - 0.15) < 0.02), per_row
    # 80% <mask>, 10% random, 10% unchanged (~2,300 targets: 4-sigma tolerances).
    t_orig, t_new = ids[is_target], masked[is_target]
    n = len(t_orig)
    to_mask = np.mean(t_new == SPECIAL.mask)
    kept = np.mean(t_new == t_orig)
    random = np.mean((t_new != SPECIAL.mask) & (t_new != t_orig))
    assert abs(to_mask - 0.8) < 4 * math.sqrt(0.16 / n), to_mask
    assert abs(kept - 0.1) < 4 * math.sqrt(0.09 / n) + 0.002, kept
    assert abs(random - 0.1) < 4 * math.sqrt(0.09 / n), random
    # Random replacements are never special tokens.
    replaced = t_new[(t_new != SPECIAL.mask) & (t_new != t_orig)]
    assert not np.any(np.isin(replaced, np.arange(7)))
    # The prediction slots list exactly the targets.
    rows = np.arange(ids.shape[0])[:, None]
    slots = np.zeros_like(is_target)
    slots[rows, out["positions"]] |= out["valid"]
    assert np.array_equal(slots, is_target)
    assert np.array_equal(out["targets"][out["valid"]], ids[rows, out["positions"]][out["valid"]])


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


# --------------------------------------------------------------------------- packing


def _numbered_docs(seed=0, n_docs=40):
    """Documents whose tokens are consecutive integers across the whole corpus."""
    rng = np.random.default_rng(seed)
    docs, next_id, starts = [], 10, set()
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 6))):
            n = int(rng.integers(2, 12))
            starts.add(next_id)
            doc.append(np.arange(next_id, next_id + n, dtype=np.int32))
            next_id += n
        docs.append(doc)
    return docs, starts


def _segments(row_ids, row_types, row_mask):
    n = int(row_mask.sum())
    assert row_mask[:n].all() and not row_mask[n:].any()
    seps = np.flatnonzero(row_ids[:n] == SPECIAL.sep)
    assert len(seps) == 2 and seps[1] == n - 1
    a, b = row_ids[1 : seps[0]], row_ids[seps[0] + 1 : seps[1]]
    expected_types = [2] + [0] * (len(a) + 1) + [1] * (len(b) + 1)
    assert list(row_types[:n]) == expected_types
    assert not row_types[n:].any() and (row_ids[n:] == SPECIAL.pad).all()
    return a, b


def test_packing_layout_types_and_lengths():
    docs, starts = _numbered_docs()
    seq_len, stride = 32, 4
    ex = data.pack_examples(
        docs, np.random.default_rng(0), seq_len, SPECIAL, stride, 0.5, shuffle_documents=False
    )
    ids, tt, am = ex["input_ids"], ex["token_type_ids"], ex["attention_mask"]
    assert ids.shape == tt.shape == am.shape and ids.shape[1] == seq_len
    assert (ids[:, 0] == SPECIAL.cls).all()
    # The last stride - 1 positions are always padding (the original's truncate_seq rule).
    assert not am[:, -(stride - 1) :].any()
    prev_a = -1
    for r in range(len(ids)):
        a, b = _segments(ids[r], tt[r], am[r])
        assert len(a) > 0 and len(b) > 0
        assert len(a) + len(b) <= seq_len - 3 - (stride - 1)
        for seg in (a, b):  # each segment is a contiguous piece of the stream
            assert np.array_equal(seg, np.arange(seg[0], seg[0] + len(seg)))
        assert a[0] in starts  # A starts at a sentence start
        assert a[0] > prev_a  # the stream is walked forwards
        prev_a = a[0]
        if ex["random_next"][r] == 0:
            assert b[0] > a[-1]  # B follows A
    assert 0.3 < ex["random_next"].mean() < 0.8
    # Nearly all of the stream is used: A segments start before the last tokens.
    assert prev_a > 10 + 0.8 * sum(len(s) for d in docs for s in d)


def test_truncation_stride_follows_the_config():
    assert data.truncation_stride(FunnelConfig(block_sizes=(1, 1, 1))) == 4
    assert data.truncation_stride(FunnelConfig(block_sizes=(1, 1))) == 2
    assert data.truncation_stride(FunnelConfig(block_sizes=(2,))) == 1
    assert data.truncation_stride(FunnelConfig(block_sizes=(1, 1, 1), truncate_seq=False)) == 1


def test_validate_token_ids():
    data.validate_token_ids(np.array([0, 5, 9]), 10)
    with pytest.raises(ValueError, match="token id 10 is outside"):
        data.validate_token_ids(np.array([0, 10]), 10, "corpus")
    with pytest.raises(ValueError, match="-1"):
        data.validate_token_ids(np.array([-1]), 10)


# --------------------------------------------------------------------------- corpus


def _texts(paths):
    return [d.text for d in data.iter_documents(paths)]


def test_corpus_formats_and_errors(tmp_path):
    """The corpus reader every pretraining run goes through (--corpus prepares with it)."""
    txt = tmp_path / "a.txt"
    txt.write_text("First sentence. Second one!\nThird line.\n\n\nNext document here.\n")
    sub = tmp_path / "dir" / "nested"
    sub.mkdir(parents=True)
    (sub / "b.txt").write_text("Only doc.\n")
    (sub / "ignored.md").write_text("not read\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "A json doc. With two sentences."}\n\n{"text": "Another."}\n')
    docs = _texts([txt, tmp_path / "dir", jsonl])
    assert docs == [
        "First sentence. Second one!\nThird line.",
        "Next document here.",
        "Only doc.",
        "A json doc. With two sentences.",
        "Another.",
    ]
    assert data.split_sentences(docs[0]) == ["First sentence.", "Second one!", "Third line."]

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        _texts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(data.CorpusError, match=r"empty\.txt: the file is empty"):
        _texts(empty)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(data.CorpusError, match=r"blob\.txt:1: not a text file"):
        _texts(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(data.CorpusError, match=r"latin\.txt:1: not UTF-8"):
        _texts(latin)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(data.CorpusError, match=r"bad\.jsonl:2: not valid JSON"):
        _texts(bad)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    with pytest.raises(data.CorpusError, match=r'notext\.jsonl:1: .*"text"'):
        _texts(notext)
    nodir = tmp_path / "nothing"
    nodir.mkdir()
    with pytest.raises(data.CorpusError, match=r"nothing: directory holds no \*\.txt"):
        _texts(nodir)


@pytest.fixture(scope="module")
def stdlib_docs():
    return data.stdlib_corpus()


def test_stdlib_corpus_is_real_english_and_deterministic(stdlib_docs):
    assert len(stdlib_docs) > 150
    text = "\n".join(stdlib_docs)
    assert len(text) > 300_000
    words = text.lower().split()
    assert words.count("the") > 0.02 * len(words)  # English prose, not code
    assert ">>>" not in text
    data._stdlib_corpus_cached.cache_clear()  # a second child interpreter gives the same text
    assert data.stdlib_corpus() == stdlib_docs


# --------------------------------------------------------------------------- optimizer


TINY_MODEL = FunnelConfig(
    vocab_size=50,
    block_sizes=(1, 1, 1),
    num_decoder_layers=2,
    d_model=16,
    n_head=4,
    d_head=4,
    d_inner=32,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)


def test_learning_rate_schedule_values():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110)
    f = learning_rate_schedule(cfg)
    for count, expected in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.5), (100, 0.1), (110, 0.0)]:
        assert float(f(count)) == pytest.approx(expected, abs=1e-6), count
    assert float(f(500)) == 0.0
    ratio = learning_rate_schedule(cfg.replace(warmup_steps=0, warmup_ratio=0.5, total_steps=20))
    assert float(ratio(5)) == pytest.approx(0.5) and float(ratio(15)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(OptimizerConfig())


def test_weight_decay_mask_and_effect():
    params = abstract_params(FunnelForPreTraining(TINY_MODEL))
    mask = weight_decay_mask(params)
    enc = mask["funnel"]["encoder"]["blocks_0_0"]
    assert enc["attention"]["q_head"]["kernel"] is True
    assert enc["attention"]["k_head"]["bias"] is False
    assert enc["attention"]["r_w_bias"] is True  # an attention bias vector, decayed as weights
    assert enc["attention"]["layer_norm"]["ln"]["scale"] is False
    assert enc["ffn"]["layer_norm"]["ln"]["bias"] is False
    assert enc["ffn"]["linear_1"]["kernel"] is True
    emb = mask["funnel"]["embeddings"]
    assert emb["word_embeddings"]["embedding"] is True
    assert emb["layer_norm"]["ln"]["scale"] is False
    assert mask["discriminator_predictions"]["dense_prediction"]["bias"] is False

    # One AdamW step with zero gradients: only the decayed params shrink, by lr * wd * p.
    tree = {
        "dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)},
        "layer_norm": {"ln": {"scale": jnp.full((2,), 2.0)}},
    }
    tx = make_optimizer(
        OptimizerConfig(learning_rate=0.5, weight_decay=0.1, total_steps=10, clip_norm=None)
    )
    zeros = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = tx.update(zeros, tx.init(tree), tree)
    new = optax.apply_updates(tree, updates)
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 - 0.5 * 0.1 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(new["dense"]["bias"], 2.0)
    np.testing.assert_array_equal(new["layer_norm"]["ln"]["scale"], 2.0)


def test_layerwise_lr_scales():
    d = 0.5
    # FunnelForPreTraining with 3 encoder layers and 2 decoder layers: 5 layers.
    s = layerwise_lr_scales(abstract_params(FunnelForPreTraining(TINY_MODEL)), d)
    assert s["funnel"]["embeddings"]["word_embeddings"]["embedding"] == d**5
    assert s["funnel"]["encoder"]["blocks_0_0"]["ffn"]["linear_1"]["kernel"] == d**4
    assert s["funnel"]["encoder"]["blocks_2_0"]["attention"]["r_kernel"] == d**2
    assert s["funnel"]["decoder"]["layers_0"]["ffn"]["linear_2"]["bias"] == d
    assert s["funnel"]["decoder"]["layers_1"]["ffn"]["linear_2"]["bias"] == 1.0
    assert s["discriminator_predictions"]["dense"]["kernel"] == 1.0
    # A base model (no decoder) with a classifier: 3 layers.
    cfg = TINY_MODEL.replace(block_sizes=(2, 1), block_repeats=None)
    from funnel_jax.models import FunnelForSequenceClassification

    s = layerwise_lr_scales(abstract_params(FunnelForSequenceClassification(cfg)), d)
    assert s["funnel"]["embeddings"]["layer_norm"]["ln"]["scale"] == d**3
    assert s["funnel"]["encoder"]["blocks_0_1"]["ffn"]["linear_1"]["kernel"] == d
    assert s["classifier"]["linear_out"]["kernel"] == 1.0
    # Wired into the optimizer: with plain SGD-like updates the scale shows in the step size.
    assert abstract_params(FunnelBaseModel(cfg))  # the base model builds too


# --------------------------------------------------------------------------- train step


def _linear_loss(params, batch, rng):
    del rng
    pred = batch["x"] @ params["w"]
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"][0]
    return loss, {"pred_mean": jnp.mean(pred)}


def _linear_setup():
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)}
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
        "scale": jnp.ones((8,), jnp.float32),
    }
    cfg = OptimizerConfig(learning_rate=0.1, warmup_steps=0, total_steps=10, weight_decay=0.01)
    return params, batch, cfg


def test_gradient_accumulation_equals_one_big_batch():
    params, batch, cfg = _linear_setup()
    results = {}
    for k in (1, 4):
        tx = make_optimizer(cfg)
        step = jit_train_step(make_train_step(_linear_loss, tx, grad_accum_steps=k))
        state = TrainState.create(jax.tree.map(jnp.copy, params), tx, 0)
        for _ in range(3):
            state, metrics = step(state, batch)
        results[k] = (jax.device_get(state.params), jax.device_get(metrics))
    np.testing.assert_allclose(results[1][0]["w"], results[4][0]["w"], rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm", "pred_mean"):
        assert results[1][1][key] == pytest.approx(results[4][1][key], rel=1e-5, abs=1e-6)
    tx = make_optimizer(cfg)
    bad = make_train_step(_linear_loss, tx, grad_accum_steps=3)
    with pytest.raises(ValueError, match="multiple of 3"):
        jax.jit(bad)(TrainState.create(params, tx, 0), batch)


def test_nonfinite_gradients_skip_the_update():
    params, batch, cfg = _linear_setup()
    tx = make_optimizer(cfg)
    step = jit_train_step(make_train_step(_linear_loss, tx), donate=False)
    state = TrainState.create(params, tx, 0)
    state1, m1 = step(state, batch)
    assert int(m1["skipped"]) == 0 and int(state1.step) == 1
    nan_batch = {**batch, "scale": jnp.full((8,), jnp.nan)}
    state2, m2 = step(state1, nan_batch)
    assert int(m2["skipped"]) == 1
    assert int(state2.step) == 2  # the step is still counted
    for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state2.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(state1.opt_state), jax.tree.leaves(state2.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(state1.rng, state2.rng)  # the randomness moves on
    state3, m3 = step(state2, batch)
    assert int(m3["skipped"]) == 0
    assert not np.array_equal(state3.params["w"], state2.params["w"])


# --------------------------------------------------------------------------- objectives


UNIT_MODEL = TINY_MODEL.replace(block_sizes=(1, 1), block_repeats=None, num_decoder_layers=1)


def test_generator_config_scales_width_not_depth():
    gen = generator_config(TINY_MODEL.replace(d_model=64, d_inner=256), 0.25)
    assert (gen.d_model, gen.d_inner, gen.n_head, gen.d_head) == (16, 64, 1, 4)
    assert gen.block_sizes == TINY_MODEL.block_sizes
    assert gen.num_decoder_layers == TINY_MODEL.num_decoder_layers
    with pytest.raises(ValueError, match="n_head"):
        generator_config(TINY_MODEL, 0.2)


def test_electra_shares_embeddings_and_sampling_has_no_gradient():
    special = SPECIAL.__class__(**{**SPECIAL.__dict__, "vocab_size": 50})
    obj = ElectraObjective(UNIT_MODEL, ObjectiveConfig(disc_weight=0.0), special, seq_len=16)
    params = jax.jit(obj.init)(jax.random.PRNGKey(0))
    # The discriminator is exactly a FunnelForPreTraining (it is what gets exported).
    want = abstract_params(FunnelForPreTraining(UNIT_MODEL))
    assert jax.tree.map(lambda x: x.shape, params["discriminator"]) == jax.tree.map(
        lambda x: x.shape, want
    )
    assert "embeddings" not in params["generator"]  # no table of its own
    assert params["generator"]["input_projection"]["kernel"].shape == (16, 4)
    ids, am = _synthetic_batch(np.random.default_rng(2), batch=4, length=16, vocab=50)
    batch = {"input_ids": ids, "attention_mask": am, "token_type_ids": np.zeros_like(ids)}
    loss = lambda p: obj.loss(p, batch, jax.random.PRNGKey(1), deterministic=True)[0]  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    norm = lambda t: float(optax.tree.norm(t))  # noqa: E731
    disc = grads["discriminator"]
    # With disc_weight 0 only the generator's MLM loss counts: it reaches the shared embedding
    # (table and LayerNorm) but nothing else of the discriminator; sampling passes no gradient.
    assert norm(disc["funnel"]["embeddings"]["word_embeddings"]) > 0
    assert norm(disc["funnel"]["embeddings"]["layer_norm"]) > 0
    assert norm(disc["funnel"]["encoder"]) == 0 and norm(disc["funnel"]["decoder"]) == 0
    assert norm(disc["discriminator_predictions"]) == 0
    assert norm(grads["generator"]) > 0


def test_mlm_head_on_targets_equals_funnel_for_masked_lm():
    special = SPECIAL.__class__(**{**SPECIAL.__dict__, "vocab_size": 50})
    obj = MlmObjective(UNIT_MODEL, ObjectiveConfig(name="mlm"), special, seq_len=16)
    params = jax.jit(obj.init)(jax.random.PRNGKey(0))
    ids, am = _synthetic_batch(np.random.default_rng(3), batch=3, length=16, vocab=50)
    tt = np.zeros_like(ids)
    positions = np.array([[1, 4, 7], [2, 3, 9], [6, 8, 10]], np.int32)
    ours = jax.jit(obj.logits_at)(params, ids, am, tt, positions)
    model = FunnelForMaskedLM(UNIT_MODEL)
    full = jax.jit(lambda p: model.apply({"params": p}, ids, am, tt).logits)(params)
    ref = np.take_along_axis(np.asarray(full), positions[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- entry point

from experiments import pretrain  # noqa: E402


@pytest.fixture(scope="module")
def small_run_inputs(tmp_path_factory, stdlib_docs):
    """A ~30k-token corpus file (real English) and a tokenizer trained once on it."""
    from funnel_jax.tokenizer import FunnelTokenizer

    root = tmp_path_factory.mktemp("pretrain_inputs")
    docs, total = [], 0
    for d in stdlib_docs:
        docs.append(d)
        total += len(d)
        if total > 150_000:
            break
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = FunnelTokenizer.train(iter(docs), vocab_size=1000)
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    return corpus, tok_dir


def _args(inputs, out_dir, *extra):
    corpus, tok_dir = inputs
    return [
        "--config",
        "tiny",
        "--corpus",
        str(corpus),
        "--tokenizer",
        str(tok_dir),
        "--output-dir",
        str(out_dir),
        "--seq-len",
        "32",
        "--batch-size",
        "8",
        "--no-progress",
        "--compile-cache",
        "",
        "--set",
        "model.block_sizes=[1,1]",
        "model.num_decoder_layers=1",
        "model.d_model=32",
        "model.n_head=4",
        "model.d_head=8",
        "model.d_inner=64",
        "data.eval_fraction=0.1",
        "data.eval_batches=2",
        "train.log_every=1",
        "optimizer.total_steps=100",  # one schedule for every run: one compilation
        "optimizer.warmup_steps=10",
        *extra,
    ]


def test_pretrain_few_steps_writes_everything_and_restart_is_a_no_op(small_run_inputs, tmp_path):
    from funnel_jax.checkpoint import load_model_dir

    out = tmp_path / "run"
    summary = pretrain.run(_args(small_run_inputs, out, "--steps", "6", "--save-every", "2"))
    assert summary["steps"] == 6 and summary["objective"] == "electra"
    for key in ("mlm_loss", "mlm_acc", "disc_loss", "disc_acc", "rtd_auc"):
        assert math.isfinite(summary["start"][key]) and math.isfinite(summary["end"][key])
    rows = pretrain.read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 6]
    speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train" and "tokens_per_s" in r]
    assert len(speeds) >= 4 and min(speeds) > 0  # the first (compiling) step has none
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["FunnelForPreTraining"]
    for d in (out / "final", out / "tokenizer"):
        assert (d / "tokenizer.json").is_file() and (d / "vocab.txt").is_file()
    # The exported model is the discriminator of the last checkpoint.
    state, extra = pretrain.restore_state(out)
    assert int(state.step) == 6 and extra["data"]["step"] == 6
    _, final_params = load_model_dir(out / "final")
    for a, b in zip(
        jax.tree.leaves(final_params), jax.tree.leaves(state.params["discriminator"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    from funnel_jax.checkpoint import TrainCheckpointer

    assert TrainCheckpointer(out / "checkpoints").all_steps() == [2, 4, 6]

    # A second start leaves the finished run as it is.
    watched = [out / "summary.json", out / "metrics.jsonl", out / "final" / "config.json"]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in watched]
    again = pretrain.run(_args(small_run_inputs, out, "--steps", "6", "--save-every", "2"))
    assert again["already_finished"] is True
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in watched] == before
    # Other settings on the same directory are refused, naming what differs.
    with pytest.raises(pretrain.ConfigError, match=r"train\.steps: saved 6, now 7"):
        pretrain.run(_args(small_run_inputs, out, "--steps", "7"))


def test_resume_is_bit_identical_to_an_uninterrupted_run(small_run_inputs, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    pretrain.run(_args(small_run_inputs, full, "--steps", "6", "--save-every", "100"))
    stopped = pretrain.run(
        _args(small_run_inputs, split, "--steps", "6", "--save-every", "100", "--stop-after", "3")
    )
    assert stopped["stopped_at"] == 3
    assert not (split / "final").exists()
    resumed = pretrain.run(_args(small_run_inputs, split, "--steps", "6", "--save-every", "100"))
    assert resumed["resumed_from"] == 3
    a, extra_a = pretrain.restore_state(full)
    b, extra_b = pretrain.restore_state(split)
    assert int(a.step) == int(b.step) == 6 and extra_a["data"] == extra_b["data"]
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)

    def train_rows(d):
        rows = pretrain.read_metrics(d / "metrics.jsonl")
        drop = ("time", "tokens_per_s")
        return [
            {k: v for k, v in r.items() if k not in drop} for r in rows if r["split"] == "train"
        ]

    assert train_rows(full) == train_rows(split)
    assert resumed["end"] == pretrain.load_json_object(full / "summary.json")["end"]


def test_discriminator_learns_in_100_steps(small_run_inputs, tmp_path):
    """Thresholds: over 100 steps of the tiny model the held-out discriminator loss falls by at
    least 30%, the detection accuracy rises by at least 0.15 and beats always answering
    'original' (1 - replaced fraction), and the AUC exceeds 0.7 (0.5 = chance)."""
    summary = pretrain.run(
        _args(
            small_run_inputs,
            tmp_path / "learn",
            "--steps",
            "100",
            "--save-every",
            "1000",
            "--set",
            "train.log_every=20",
            "data.eval_batches=4",
        )
    )
    start, end = summary["start"], summary["end"]
    assert end["disc_loss"] < 0.7 * start["disc_loss"], (start, end)
    assert end["disc_acc"] > start["disc_acc"] + 0.15, (start, end)
    assert end["disc_acc"] > 1.0 - end["replaced_frac"], end
    assert end["rtd_auc"] > 0.7, end
    assert end["mlm_loss"] < start["mlm_loss"], (start, end)


def test_mlm_objective_exports_a_masked_lm(small_run_inputs, tmp_path):
    out = tmp_path / "mlm"
    summary = pretrain.run(_args(small_run_inputs, out, "--steps", "2", "--objective", "mlm"))
    assert summary["objective"] == "mlm" and "disc_loss" not in summary["end"]
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["FunnelForMaskedLM"]


def test_bad_settings_are_refused_with_clear_errors(small_run_inputs, tmp_path):
    with pytest.raises(pretrain.ConfigError, match="unknown section"):
        pretrain.run(_args(small_run_inputs, tmp_path / "x", "bogus.key=1"))
    with pytest.raises(pretrain.ConfigError, match=r"FunnelConfig has no such field"):
        pretrain.run(_args(small_run_inputs, tmp_path / "x", "model.dmodel=3"))
    with pytest.raises(FileNotFoundError, match="no pretraining config named 'nope'"):
        pretrain.run(["--config", "nope", "--output-dir", str(tmp_path / "y")])
    with pytest.raises(FileNotFoundError, match="corpus path not found"):
        pretrain.run(
            [
                "--corpus",
                str(tmp_path / "absent.txt"),
                "--output-dir",
                str(tmp_path / "z"),
                "--tokenizer",
                str(small_run_inputs[1]),
                "--compile-cache",
                "",
            ]
        )


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_presets_load_and_cite_their_source(name):
    path = pretrain.resolve_config_path(name)
    raw = json.loads(Path(path).read_text())
    assert "_source" in raw and len(raw["_source"]) > 40
    cfg = pretrain.load_run_config(pretrain.parse_args(["--config", name]))
    FunnelConfig.from_dict({**cfg.model, "vocab_size": 30522})
    if name != "tiny":
        assert cfg.data.seq_len == 512 and cfg.data.batch_size == 256
        assert cfg.optimizer["b2"] == 0.99 and cfg.optimizer["eps"] == 1e-6
        assert cfg.train.steps == 1_000_000
