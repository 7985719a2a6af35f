"""Offline data preparation (funnel_jax/prepare.py) and the deterministic vocabulary
(funnel_jax/vocab.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
