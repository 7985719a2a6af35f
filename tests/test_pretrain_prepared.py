"""`python -m experiments.pretrain --data DIR`: pretraining from a directory prepared by
funnel_jax.prepare (its shards through funnel_jax.loader, its tokenizer); settings the data
contradicts are refused, naming both values; a restart on other data is refused; and the
embedded default, prepared into a cache, gives the same model in two fresh runs."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from experiments import pretrain
from funnel_jax import data
from funnel_jax.config import FunnelConfig
from funnel_jax.prepare import prepare_corpus, read_manifest
from funnel_jax.training.pretraining import load_pretrain_config

SEQ_LEN = 32
MODEL_SET = [
    "model.block_sizes=[1,1]",
    "model.num_decoder_layers=1",
    "model.d_model=32",
    "model.n_head=4",
    "model.d_head=8",
    "model.d_inner=64",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A ~150 kB real-English corpus prepared for the tiny model below (seq_len 32, its
    truncate stride, a 1000-token vocabulary trained by the preparation)."""
    root = tmp_path_factory.mktemp("pretrain_prepared")
    docs, total = [], 0
    for d in data.stdlib_corpus():
        docs.append(d)
        total += len(d)
        if total > 150_000:
            break
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    model = load_pretrain_config("tiny", MODEL_SET).model
    stride = data.truncation_stride(FunnelConfig.from_dict({**model, "vocab_size": 1000}))
    out = root / "prepared"
    prepare_corpus(
        [corpus],
        out,
        seq_len=SEQ_LEN,
        vocab_size=1000,
        workers=0,
        num_shards=2,
        truncate_stride=stride,
        eval_fraction=0.1,
        chunk_chars=1 << 15,
        progress=False,
    )
    return out


def _args(data_dir, out_dir, *extra, seq_len=SEQ_LEN):
    return [
        "--config",
        "tiny",
        "--data",
        str(data_dir),
        "--output-dir",
        str(out_dir),
        "--seq-len",
        str(seq_len),
        "--batch-size",
        "8",
        "--no-progress",
        "--compile-cache",
        "",
        "--set",
        *MODEL_SET,
        "data.eval_batches=2",
        "train.log_every=1",
        "optimizer.total_steps=100",
        "optimizer.warmup_steps=10",
        *extra,
    ]


def test_data_dir_run_reads_the_prepared_directory(prepared, tmp_path):
    """A --data run takes the directory's tokenizer and train split, and a restart on other data
    is refused. (Its resume is the loader's: tests/test_pretrain.py's bit-identical resume runs
    --corpus through the same prepared-shard path, tests/test_loader.py the loader alone.)"""
    full = tmp_path / "full"
    summary = pretrain.run(_args(prepared, full, "--steps", "3", "--save-every", "100"))
    assert summary["steps"] == 3 and summary["resumed_from"] is None
    manifest = read_manifest(prepared)
    assert (full / "tokenizer" / "vocab.txt").read_bytes() == (
        prepared / "tokenizer" / "vocab.txt"
    ).read_bytes()
    assert not (full / "data").exists()  # nothing prepared again
    state, extra = pretrain.restore_state(full)
    assert int(state.step) == 3 and extra["data"]["step"] == 3
    assert extra["data"]["split"] == "train"
    assert extra["data"]["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
    assert extra["data"]["num_records"] == manifest["splits"]["train"]["records"]

    # A restart of the finished run on other data (a copy elsewhere) is refused, naming it.
    other = tmp_path / "other_data"
    shutil.copytree(prepared, other)
    with pytest.raises(pretrain.ConfigError, match=r"data_dir: saved .*prepared.*, now .*other"):
        pretrain.run(_args(other, full, "--steps", "3", "--save-every", "100"))


def test_data_dir_settings_the_data_contradicts_are_refused(prepared, tmp_path):
    with pytest.raises(pretrain.ConfigError, match=rf"seq_len={SEQ_LEN}, the model needs 64"):
        pretrain.run(_args(prepared, tmp_path / "a", "--steps", "2", seq_len=64))
    with pytest.raises(pretrain.ConfigError, match="--corpus cannot be given with it"):
        pretrain.run(_args(prepared, tmp_path / "b", "--steps", "2", "--corpus", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no prepared data here"):
        pretrain.run(_args(tmp_path / "missing", tmp_path / "c", "--steps", "2"))


def test_a_corrupt_manifest_is_an_error_line_not_a_traceback(prepared, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    (bad / "manifest.json").write_text('{"format": ')
    assert pretrain.main(_args(bad, tmp_path / "out", "--steps", "2")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "manifest.json: not a JSON manifest" in err, err


def test_two_fresh_default_runs_end_bit_identical(tmp_path):
    """The embedded default (no corpus, no tokenizer): two runs of the same command and seed,
    each in its own process (other hash seeds), fresh cache and fresh output directory, prepare
    byte-identical data (vocabulary trained) and end with bit-identical parameters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from funnel_jax.checkpoint import load_model_dir

    root = Path(__file__).resolve().parents[1]
    args = [
        "--steps", "3", "--seq-len", str(SEQ_LEN), "--batch-size", "8", "--seed", "5",
        "--no-progress", "--compile-cache", str(tmp_path / "xla"),
        "--set", *MODEL_SET, "data.eval_batches=1", "optimizer.warmup_steps=1",
    ]  # fmt: skip
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(
            FUNNEL_JAX_CACHE=str(tmp_path / f"cache_{name}"),
            PYTHONHASHSEED=hash_seed,
            FUNNEL_JAX_NO_JEMALLOC="1",
            JAX_PLATFORMS="cpu",
        )
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.pretrain", *args, "--output-dir", str(out)],
            cwd=root, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    [data_a] = (tmp_path / "cache_a").glob("stdlib-*/data")
    [data_b] = (tmp_path / "cache_b").glob("stdlib-*/data")
    assert data_a.parent.name == data_b.parent.name  # the same cache key
    files_a = sorted(p.relative_to(data_a) for p in data_a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(data_b) for p in data_b.rglob("*") if p.is_file())
    assert files_a == files_b and Path("tokenizer/vocab.txt") in files_a
    for rel in files_a:
        if rel.name != "manifest.json":  # holds the corpus path and the preparation time
            assert (data_a / rel).read_bytes() == (data_b / rel).read_bytes(), rel
    assert read_manifest(data_a)["splits"] == read_manifest(data_b)["splits"]
    _, params_a = load_model_dir(tmp_path / "a" / "final")
    _, params_b = load_model_dir(tmp_path / "b" / "final")
    leaves_a = jax.tree_util.tree_leaves_with_path(params_a)
    leaves_b = jax.tree_util.tree_leaves_with_path(params_b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
