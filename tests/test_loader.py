"""The grain loader over prepared shards (funnel_jax/loader.py): exact resume, global batches
independent of the process count (also across a restore on another count), epochs as
permutations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from funnel_jax import data
from funnel_jax.loader import FeistelPermutation, PreparedBatches, read_manifest, tokenizer_dir
from funnel_jax.prepare import prepare_corpus

GLOBAL = 8


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(data.stdlib_corpus()[:120]), encoding="utf-8")
    out = root / "prepared"
    prepare_corpus(
        [corpus],
        out,
        seq_len=64,
        vocab_size=1500,
        workers=0,
        num_shards=3,
        truncate_stride=2,
        eval_fraction=0.1,
        chunk_chars=1 << 15,
        progress=False,
    )
    return out


def loaders(prepared, count, **kw):
    return [
        PreparedBatches(
            prepared,
            global_batch=GLOBAL,
            seed=3,
            process_index=i,
            process_count=count,
            num_threads=1,
            **kw,
        )  # fmt: skip
        for i in range(count)
    ]


def global_batches(parts: list[PreparedBatches], n: int) -> list[dict[str, np.ndarray]]:
    per = [p.take(n) for p in parts]
    return [{k: np.concatenate([b[s][k] for b in per]) for k in per[0][s]} for s in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_layout(prepared):
    (it,) = loaders(prepared, 1)
    b = next(it)
    assert set(b) == {"input_ids", "token_type_ids", "attention_mask", "random_next"}
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert b[k].shape == (GLOBAL, 64) and b[k].dtype == np.int32, k
    assert b["random_next"].shape == (GLOBAL,) and b["random_next"].dtype == np.int32
    manifest = read_manifest(prepared)
    from funnel_jax.tokenizer import FunnelTokenizer

    tok = FunnelTokenizer.from_pretrained(tokenizer_dir(prepared))
    assert len(tok) == manifest["tokenizer"]["vocab_size"]
    assert (b["input_ids"][:, 0] == tok.cls_token_id).all()
    assert (b["token_type_ids"][:, 0] == data.CLS_TYPE_ID).all()
    n = b["attention_mask"].sum(1)
    assert (n <= 64 - 1).all()  # truncate_stride 2 leaves one pad at least
    rows = np.arange(GLOBAL)
    assert (b["input_ids"][rows, n - 1] == tok.sep_token_id).all()
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    assert it.num_tokens == manifest["splits"]["train"]["tokens"]
    it.close()


def test_exact_resume(prepared):
    (full,) = loaders(prepared, 1)
    expected = full.take(12)
    (first,) = loaders(prepared, 1)
    first.take(5)
    state = json.loads(json.dumps(first.state()))  # what the checkpoint's JSON extra holds
    first.close()
    (resumed,) = loaders(prepared, 1)
    resumed.restore(state)
    assert_same(resumed.take(7), expected[5:])
    for it in (full, resumed):
        it.close()


def test_process_counts_see_the_same_global_batches(prepared):
    results = {count: global_batches(loaders(prepared, count), 6) for count in (1, 2, 4)}
    assert_same(results[2], results[1])
    assert_same(results[4], results[1])
    # Restored on another process count: 1 process for 2 steps, then 4 processes.
    (one,) = loaders(prepared, 1)
    one.take(2)
    state = one.state()
    four = loaders(prepared, 4)
    for it in four:
        it.restore(state)
    assert_same(global_batches(four, 4), results[1][2:])
    # ... and 4 processes for 3 steps, then 2.
    four = loaders(prepared, 4)
    for it in four:
        it.take(3)
    states = [it.state() for it in four]
    assert all(s == states[0] for s in states)  # every process saves the same position
    two = loaders(prepared, 2)
    for it in two:
        it.restore(json.loads(json.dumps(states[0])))
    assert_same(global_batches(two, 3), results[1][3:])


def test_epochs_are_permutations(prepared):
    (it,) = loaders(prepared, 1)
    n = it.num_records
    steps = -(-2 * n // GLOBAL)
    idx = np.concatenate([it._read.record_indices(t) for t in range(steps)])
    assert sorted(idx[:n].tolist()) == list(range(n))  # epoch 0: every record once
    assert sorted(idx[n : 2 * n].tolist()) == list(range(n))  # epoch 1 too ...
    assert not np.array_equal(idx[:n], idx[n : 2 * n])  # ... in another order
    assert not np.array_equal(idx[:n], np.arange(n))
    (ordered,) = loaders(prepared, 1, shuffle=False)
    assert ordered._read.record_indices(1).tolist() == list(range(GLOBAL, 2 * GLOBAL))
    # The shuffled epoch holds exactly the examples of the ordered one.
    shuffled = np.concatenate([it.batch_at(t)["input_ids"] for t in range(n // GLOBAL)])
    plain = np.concatenate([ordered.batch_at(t)["input_ids"] for t in range(n // GLOBAL)])
    order = idx[: len(shuffled)]
    full_plain = np.concatenate([plain, ordered._read(n // GLOBAL)["input_ids"]])
    np.testing.assert_array_equal(shuffled, full_plain[order])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_feistel_permutation(n):
    p = FeistelPermutation(n, seed=11)
    y = p(np.arange(n), epoch=0)
    assert sorted(y.tolist()) == list(range(n))
    np.testing.assert_array_equal(p(np.arange(n)[::-1], 0), y[::-1])  # index-wise
    if n >= 64:
        assert not np.array_equal(y, FeistelPermutation(n, seed=12)(np.arange(n), 0))


def test_eval_split_and_errors(prepared):
    ev = PreparedBatches(prepared, split="eval", global_batch=2, seed=0, shuffle=False)
    assert ev.num_records == read_manifest(prepared)["splits"]["eval"]["records"]
    assert_same(ev.take(2), [ev.batch_at(0), ev.batch_at(1)])
    ev.close()
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        PreparedBatches(prepared, global_batch=8, process_count=3)
    with pytest.raises(ValueError, match="seq_len=64, the model needs 128"):
        PreparedBatches(prepared, global_batch=8, seq_len=128)
    with pytest.raises(ValueError, match="truncate_stride=2, the model needs 4"):
        PreparedBatches(prepared, global_batch=8, truncate_stride=4)
    with pytest.raises(ValueError, match="more than the model's vocab_size=100"):
        PreparedBatches(prepared, global_batch=8, vocab_size=100)
    with pytest.raises(ValueError, match="no split 'test'"):
        PreparedBatches(prepared, split="test", global_batch=8)
    with pytest.raises(FileNotFoundError, match="no prepared data here"):
        PreparedBatches(prepared / "nope", global_batch=8)
    (it,) = loaders(prepared, 1)
    state = it.state()
    other = PreparedBatches(prepared, global_batch=16, seed=3)
    with pytest.raises(ValueError, match="global_batch: saved 8, now 16"):
        other.restore(state)
