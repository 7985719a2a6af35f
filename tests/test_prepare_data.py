"""Offline data preparation (funnel_jax/prepare.py) and the deterministic vocabulary
(funnel_jax/vocab.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from funnel_jax import data

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stdlib_docs():
    return data.stdlib_corpus()


# ------------------------------------------------------------------------------ vocabulary

_TRAIN_SCRIPT = """
import sys
from funnel_jax.tokenizer import FunnelTokenizer
FunnelTokenizer.train(sys.argv[1], int(sys.argv[2])).save_pretrained(sys.argv[3])
"""


def test_vocab_byte_identical_across_processes(tmp_path, stdlib_docs):
    """Two processes with different hash seeds train byte-identical vocab.txt files (tokenizers'
    own trainer gives different files here: it breaks ties in hash-map order)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(stdlib_docs[:200]), encoding="utf-8")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"tok{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run(
            [sys.executable, "-c", _TRAIN_SCRIPT, str(corpus), "3000", str(out)],
            check=True,
            cwd=ROOT,
            env=env,
            timeout=300,
        )
        outs.append((out / "vocab.txt").read_bytes())
    assert len(outs[0].splitlines()) == 3000
    assert outs[0] == outs[1]


def test_vocab_ties_in_id_order():
    """Equal pair counts merge in (left id, right id) order; min_frequency stops the merges."""
    from funnel_jax.vocab import train_wordpiece_vocab

    counts = {"cd": 3, "ab": 3, "ef": 1}
    alphabet = ["<pad>", "a", "b", "c", "d", "e", "f", "##b", "##d", "##f"]
    tokens = train_wordpiece_vocab(counts, 100, special_tokens=["<pad>"], min_frequency=2)
    assert tokens == [*alphabet, "ab", "cd"]
    one_merge = train_wordpiece_vocab(counts, 11, special_tokens=["<pad>"])
    assert one_merge == [*alphabet, "ab"]  # the tie between "ab" and "cd" goes to the lower ids
    with pytest.raises(ValueError, match="vocab_size=1 must be larger"):
        train_wordpiece_vocab(counts, 1, special_tokens=["<pad>"])


# ------------------------------------------------------------------------------ preparation

EDGE_TEXTS = [
    "Plain ASCII sentence, with punctuation!!! and (brackets) [x] {y} @#$%^&* ~`|\\ end.",
    "control\x00chars\x07\x1b and\ttabs\r\nnewlines \x0b vt \x0c ff \x1c fs \x7f del",
    "a" * 150 + " " + "supercalifragilistic" * 6 + " end",
    "text with <mask> and <cls> inside, also <MASK> and <pad><unk></s><s> glued<mask>x",
    "Mixed CASE Words AND numbers 3.14159 and 1,000,000 and dates 2024-01-01T12:00",
    "Héllo Wörld, café naïve résumé; 北京欢迎你 and emoji 😀 and ß straße",
    "def f(x): return x ** 2  # a comment <not-special>",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory, stdlib_docs):
    from funnel_jax.tokenizer import FunnelTokenizer

    root = tmp_path_factory.mktemp("tok")
    tok = FunnelTokenizer.train(stdlib_docs[:150] + EDGE_TEXTS, 2000)
    tok.save_pretrained(root / "lower")
    cased = FunnelTokenizer.train(stdlib_docs[:150] + EDGE_TEXTS, 2000, lowercase=False)
    cased.save_pretrained(root / "cased")
    return root


@pytest.mark.parametrize("which", ["lower", "cased"])
def test_sentence_encoder_equals_tokenizer(small_tok, stdlib_docs, which):
    from funnel_jax.prepare import SentenceEncoder
    from funnel_jax.tokenizer import FunnelTokenizer

    tok = FunnelTokenizer.from_pretrained(small_tok / which)
    sentences = EDGE_TEXTS + [s for d in stdlib_docs[150:250] for s in data.split_sentences(d)]
    expected = tok(sentences, add_special_tokens=False, return_tensors=None)["input_ids"]
    enc = SentenceEncoder(tok)
    assert enc.fast
    assert enc(sentences) == expected
    assert enc(sentences) == expected  # with the word cache filled


def _corpus_file(tmp_path, docs, name="corpus.txt"):
    path = tmp_path / name
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


def _records(out, split="train"):
    """All examples of a prepared split in stored order (shards in order)."""
    from grain.python import ArrayRecordDataSource

    from funnel_jax.prepare import decode_records, read_manifest

    m = read_manifest(out)
    recs = []
    for s in m["splits"][split]["shards"]:
        if s["records"]:
            src = ArrayRecordDataSource([str(out / s["path"])])
            recs.extend(src.__getitems__(list(range(len(src)))))
    return decode_records(recs, m["seq_len"], m["dtype"], m["tokenizer"]["pad_id"])


def test_packing_equals_pack_examples(tmp_path, small_tok, stdlib_docs):
    """One chunk, no held-out split: the stored examples are exactly what data.pack_examples
    (today's packer) gives on the same documents with the chunk's generator."""
    from funnel_jax.prepare import prepare_corpus
    from funnel_jax.tokenizer import FunnelTokenizer

    docs = stdlib_docs[:120]
    out = tmp_path / "prep"
    prepare_corpus(
        [_corpus_file(tmp_path, docs)],
        out,
        seq_len=64,
        tokenizer=small_tok / "lower",
        workers=0,
        truncate_stride=4,
        random_next_prob=0.4,
        eval_fraction=0.0,
        seed=5,
        chunk_chars=1 << 30,
        progress=False,
    )
    tok = FunnelTokenizer.from_pretrained(small_tok / "lower")
    # The documents as the reader sees them: the file's lines, stripped, blank lines dropped.
    read_docs = [d.text for d in data.iter_documents([tmp_path / "corpus.txt"])]
    expected = data.pack_examples(
        data.tokenize_documents(tok, read_docs),
        np.random.default_rng([5, 0, 0, 0]),
        64,
        data.SpecialIds.from_tokenizer(tok),
        truncate_stride=4,
        random_next_prob=0.4,
    )
    got = _records(out)
    assert got.keys() == expected.keys()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def _stats(ex):

    types, mask = ex["token_type_ids"], ex["attention_mask"]
    len_a = ((types == data.A_TYPE_ID) & (mask == 1)).sum(1) - 1
    len_b = (types == data.B_TYPE_ID).sum(1) - 1
    return {
        "random_share": float(ex["random_next"].mean()),
        "mean_a": float(len_a.mean()),
        "mean_b": float(len_b.mean()),
        "fill": float(mask.mean()),
        "cls_type": bool((types[:, 0] == data.CLS_TYPE_ID).all()),
        "min_a": int(len_a.min()),
        "min_b": int(len_b.min()),
    }


def test_packing_statistics_over_chunks(tmp_path, small_tok, stdlib_docs):
    """Many small chunks (random B drawn within a chunk) give the segment lengths, random-B
    share and token types of one pack_examples pass over the whole corpus."""
    from funnel_jax.prepare import prepare_corpus
    from funnel_jax.tokenizer import FunnelTokenizer

    docs = stdlib_docs[:300]
    out = tmp_path / "prep"
    prepare_corpus(
        [_corpus_file(tmp_path, docs)],
        out,
        seq_len=128,
        tokenizer=small_tok / "lower",
        workers=0,
        num_shards=4,
        truncate_stride=4,
        eval_fraction=0.0,
        chunk_chars=1 << 16,
        progress=False,
    )
    tok = FunnelTokenizer.from_pretrained(small_tok / "lower")
    read_docs = [d.text for d in data.iter_documents([tmp_path / "corpus.txt"])]
    ref = data.pack_examples(
        data.tokenize_documents(tok, read_docs),
        np.random.default_rng(0),
        128,
        data.SpecialIds.from_tokenizer(tok),
        truncate_stride=4,
    )
    got, want = _stats(_records(out)), _stats(ref)
    assert got["cls_type"] and want["cls_type"]
    assert got["min_a"] >= 1 and got["min_b"] >= 1
    assert abs(got["random_share"] - want["random_share"]) < 0.04, (got, want)
    for k in ("mean_a", "mean_b", "fill"):
        assert abs(got[k] - want[k]) <= 0.05 * want[k], (k, got, want)


def test_inputs_compressed_and_jsonl(tmp_path, stdlib_docs):
    """.txt, .jsonl and their .gz / .zst give the same documents; directories find them all."""
    import gzip
    import json

    import zstandard

    docs = stdlib_docs[:20]
    text = "\n\n".join(docs).encode()
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_bytes(text)
    (d / "b.txt.gz").write_bytes(gzip.compress(text))
    (d / "c.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    (d / "d.jsonl").write_bytes(jsonl)
    (d / "e.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (d / "f.json.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (d / "skip.bin").write_bytes(b"\x00\x01")
    plain = [x.text for x in data.iter_documents(d / "a.txt")]
    assert plain == ["\n".join(ln.strip() for ln in x.splitlines() if ln.strip()) for x in docs]
    for name in ("b.txt.gz", "c.txt.zst"):
        assert [x.text for x in data.iter_documents(d / name)] == plain, name
    for name in ("d.jsonl", "e.jsonl.gz", "f.json.zst"):
        assert [x.text for x in data.iter_documents(d / name)] == docs, name
    found = data.stream_corpus_files(d)
    assert [f.name for f in found] == ["a.txt", "b.txt.gz", "c.txt.zst", "d.jsonl", "e.jsonl.gz",
                                       "f.json.zst"]  # fmt: skip


BAD_INPUTS = {
    "empty.txt": (b"\n  \n", r"empty\.txt: the file is empty"),
    "binary.txt": (b"hello\nwor\x00ld\n", r"binary\.txt:2: not a text file \(NUL byte"),
    "latin1.txt": (b"fine\ncaf\xe9\n", r"latin1\.txt:2: not UTF-8 text"),
    "bad.jsonl": (b'{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
    "nofield.jsonl": (b'{"text": "ok"}\n\n{"body": "x"}\n', r"nofield\.jsonl:3: expected a JSON"),
    "broken.txt.gz": (b"not gzip at all", r"broken\.txt\.gz: not a valid gzip file"),
    "broken.txt.zst": (b"not zstd at all", r"broken\.txt\.zst: not a valid zstandard file"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_named(tmp_path, small_tok, name):
    from funnel_jax.prepare import prepare_corpus

    content, pattern = BAD_INPUTS[name]
    good = _corpus_file(tmp_path, ["A first document. It has two sentences."], "good.txt")
    bad = tmp_path / name
    bad.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(data.CorpusError, match=pattern):
        prepare_corpus(
            [good, bad], out, seq_len=32, tokenizer=small_tok / "lower", workers=0, progress=False
        )
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_missing_input_and_settings(tmp_path, small_tok, stdlib_docs):
    from funnel_jax.prepare import PrepareError, prepare_corpus, read_manifest

    with pytest.raises(FileNotFoundError, match="corpus path not found: .*nope.txt"):
        prepare_corpus([tmp_path / "nope.txt"], tmp_path / "o", seq_len=32, vocab_size=100)
    corpus = _corpus_file(tmp_path, stdlib_docs[:30])
    kw = dict(seq_len=32, tokenizer=small_tok / "lower", workers=0, progress=False)
    m = prepare_corpus([corpus], tmp_path / "o", **kw)
    mtime = (tmp_path / "o" / "manifest.json").stat().st_mtime_ns
    assert prepare_corpus([corpus], tmp_path / "o", **kw) == m  # a rerun does nothing
    assert (tmp_path / "o" / "manifest.json").stat().st_mtime_ns == mtime
    assert read_manifest(tmp_path / "o") == m
    with pytest.raises(PrepareError, match="seq_len: saved 32, now 64"):
        prepare_corpus([corpus], tmp_path / "o", **{**kw, "seq_len": 64})
    with pytest.raises(PrepareError, match="exactly one of tokenizer"):
        prepare_corpus([corpus], tmp_path / "p", seq_len=32)
    assert m["dtype"] == "uint16" and m["splits"]["train"]["records"] > 0


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_sigkill_during_preparation_then_rerun(tmp_path, small_tok, stdlib_docs):
    """SIGKILL of `python -m experiments.prepare_data` (2 workers) while it packs leaves no
    output directory; the rerun completes and its files are byte-identical to an uninterrupted
    in-process (0 workers) preparation."""
    import re
    import signal
    import time

    from funnel_jax.prepare import prepare_corpus

    corpus = _corpus_file(tmp_path, stdlib_docs * 6)
    settings = dict(seq_len=128, num_shards=3, truncate_stride=4, chunk_chars=1 << 16)
    ref = tmp_path / "ref"
    prepare_corpus(
        [corpus], ref, tokenizer=small_tok / "lower", workers=0, progress=False, **settings
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.prepare_data", "--corpus", str(corpus),
           "--output", str(out), "--tokenizer", str(small_tok / "lower"), "--workers", "2",
           "--seq-len", "128", "--num-shards", "3", "--truncate-stride", "4",
           "--chunk-chars", str(1 << 16)]  # fmt: skip
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stderr=err, start_new_session=True)
        deadline = time.time() + 240
        while not re.search(r"preparing: +[1-9]", log.read_text(errors="replace")):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.time() < deadline, "no progress within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its workers
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert (tmp_path / ".out.partial").is_dir()
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "left by an interrupted preparation" in rerun.stderr
    assert not (tmp_path / ".out.partial").exists()
    assert _tree_bytes(out) == _tree_bytes(ref)


def test_slices_and_merge(tmp_path, small_tok, stdlib_docs):
    """Two machines' slices of the input files, merged: the loader reads every example of both
    (records and tokens add up, the eval split too); mismatched parts are refused."""
    from funnel_jax.loader import PreparedBatches
    from funnel_jax.prepare import PrepareError, merge_prepared, prepare_corpus

    files = [
        _corpus_file(tmp_path, stdlib_docs[i * 40 : (i + 1) * 40], f"f{i}.txt") for i in (0, 1)
    ]
    kw = dict(seq_len=64, tokenizer=small_tok / "lower", workers=0, eval_fraction=0.1,
              progress=False)  # fmt: skip
    parts = [tmp_path / "parts" / str(i) for i in (0, 1)]
    for i, part in enumerate(parts):
        m = prepare_corpus(files, part, slice_index=i, slice_count=2, **kw)
        assert [c["path"] for c in m["request"]["corpus"]] == [str(files[i].resolve())]
    merged = merge_prepared(parts, tmp_path / "all")
    for split in ("train", "eval"):
        want = [_records(p, split)["input_ids"] for p in parts]
        got = _records(tmp_path / "all", split)["input_ids"]
        np.testing.assert_array_equal(got, np.concatenate(want), err_msg=split)
        assert merged["splits"][split]["records"] == len(got) > 0
    it = PreparedBatches(tmp_path / "all", global_batch=4, seed=0)
    assert it.num_records == merged["splits"]["train"]["records"]
    assert next(it)["input_ids"].shape == (4, 64)
    it.close()
    other = prepare_corpus(files[:1], tmp_path / "other", **{**kw, "seq_len": 32})
    assert other["seq_len"] == 32
    with pytest.raises(PrepareError, match="seq_len 32 differs"):
        merge_prepared([parts[0], tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(PrepareError, match="slice 2 of 2"):
        prepare_corpus(files, tmp_path / "x", slice_index=2, slice_count=2, **kw)


def test_write_corpus_file_round_trips(tmp_path, stdlib_docs):
    from funnel_jax.prepare import write_corpus_file

    docs = [*stdlib_docs[:50], "  two  \n\n  blank-separated lines  ", "   "]
    path = write_corpus_file(docs, tmp_path / "sub" / "c.txt")
    want = ["\n".join(ln.strip() for ln in d.splitlines() if ln.strip()) for d in docs]
    assert [d.text for d in data.iter_documents(path)] == [w for w in want if w]
