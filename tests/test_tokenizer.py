"""FunnelTokenizer against transformers' FunnelTokenizerFast built from the same vocab.txt.

Every expected value comes from the reference (or from the `tokenizers` library itself) run in
the same test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sysconfig
import warnings

import numpy as np
import pytest

from funnel_jax.tokenizer import FunnelTokenizer

transformers = pytest.importorskip("transformers")
FunnelTokenizerFast = transformers.FunnelTokenizerFast

# ---------------------------------------------------------------------------------- corpus

_DOC_RE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'|^[ \t]*#+ ?([^\n]+)', re.S | re.M)


def stdlib_corpus() -> list[str]:
    """Offline English text: pydoc's topic help plus the docstrings and comments of the stdlib.

    About 6.5 MB; read with a regex (no imports, no ast), well under a second.
    """
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)]
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                    src = f.read()
                texts.extend(m.group(m.lastindex) for m in _DOC_RE.finditer(src))
    return texts


HARD_TEXTS = [
    "Héllo Wörld, café naïve résumé Ångström façade",
    "北京欢迎你，中文字符和English混合的句子。",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "control\x00chars\x07\x1b and\ttabs\r\nnewlines\u200b zero-width"
    "\u00a0nbsp\u2003em \u3000ideo\ufeff\u2028line-sep",
    "a" * 150 + " " + "supercalifragilistic" * 6 + " end",
    "",
    "   \t\n ",
    "text with <mask> and <cls> and <sep> inside, also <MASK> and <pad><unk></s><s> glued<mask>x",
    "<mask>",
    "Mixed CASE Words AND ÀÉÎÕÜ",
    "numbers 3.14159 and 1,000,000 and dates 2024-01-01T12:00",
    "punctuation!!! ??? ... --- ''' \"\"\" (brackets) [x] {y} @#$%^&*",
    "Ǆ ǅ ǆ ﬁ ligature ﬀ",
    "ß straße İstanbul",
    "combining e\u0301 a\u0308 versus precomposed é ä",
    "Ελληνικά Кириллица العربية עברית हिन्दी 日本語のテキスト 한국어",
    "def f(x):\n    return x ** 2  # a comment",
]

QUESTIONS = [
    "why?",
    "What does this function return?",
    "Which exception is raised when the file is missing?",
    "how",
] * 5

TINY_VOCAB = [
    "<pad>", "<unk>", "<cls>", "<sep>", "<mask>", "<s>", "</s>",
    "the", "a", "hello", "world", "cafe", "café", "naive", "str", "##asse", "##s", "##ing",
    "un", "##aff", "##able", "run", "##ner", "北", "京", "中", "文", ",", ".", "!", "?", "'",
    "<", ">", "mask", "cls", "text", "with", "and", "inside", "also", "numbers", "3", "##1",
    "emoji", "😀", "e", "##e",
]  # fmt: skip


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return stdlib_corpus()


@pytest.fixture(scope="module")
def sample_texts(corpus) -> list[str]:
    """200 random docstrings/comments of 30 to 300 characters."""
    pool = [t for t in corpus if 30 <= len(t) <= 300]
    idx = np.random.default_rng(0).choice(len(pool), size=200, replace=False)
    return [pool[i] for i in sorted(idx)]


@pytest.fixture(scope="module")
def long_texts(corpus) -> list[str]:
    """40 random texts of 600+ characters (hundreds of tokens)."""
    pool = [t for t in corpus if len(t) >= 600]
    idx = np.random.default_rng(1).choice(len(pool), size=40, replace=False)
    return [pool[i] for i in sorted(idx)]


@pytest.fixture(scope="module")
def big_vocab_dir(corpus, tmp_path_factory) -> str:
    """A ~30k WordPiece vocab.txt trained with FunnelTokenizer.train, alone in a directory."""
    tok = FunnelTokenizer.train(corpus, vocab_size=30000, min_frequency=1)
    assert tok.vocab_size > 25000
    saved = tmp_path_factory.mktemp("big_saved")
    tok.save_pretrained(saved)
    only_vocab = tmp_path_factory.mktemp("big_vocab")
    shutil.copy(saved / "vocab.txt", only_vocab / "vocab.txt")
    return str(only_vocab)


@pytest.fixture(scope="module")
def tiny_vocab_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tiny_vocab")
    (d / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return str(d)


def load_pair(vocab_dir: str, **flags):
    """(ours, reference) from the same vocab.txt, with the same flags."""
    ours = FunnelTokenizer.from_vocab(
        os.path.join(vocab_dir, "vocab.txt"),
        lowercase=flags.get("do_lower_case", True),
        strip_accents=flags.get("strip_accents"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = FunnelTokenizerFast.from_pretrained(vocab_dir, model_max_length=512, **flags)
    return ours, ref


@pytest.fixture(scope="module", params=["big", "tiny"])
def toks(request, big_vocab_dir, tiny_vocab_dir):
    vocab_dir = big_vocab_dir if request.param == "big" else tiny_vocab_dir
    return load_pair(vocab_dir)


@pytest.fixture(scope="module")
def big_toks(big_vocab_dir):
    return load_pair(big_vocab_dir)


# ---------------------------------------------------------------------------------- helpers


def _plain(x):
    """Reference values as nested python lists of ints (offset tuples become lists)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def assert_parity(ours, ref, text, text_pair=None, **kw):
    """Same keys and values as the reference, as lists and (when rectangular) as arrays."""
    o = ours(text, text_pair, return_tensors=None, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = ref(text, text_pair, return_token_type_ids=True, return_attention_mask=True, **kw)
    assert set(o) == set(r), (set(o), set(r))
    for key in r:
        assert _plain(o[key]) == _plain(r[key]), (key, text, text_pair, kw)
    rows = (
        o["input_ids"]
        if isinstance(text, list) or kw.get("return_overflowing_tokens")
        else [o["input_ids"]]
    )
    if len({len(row) for row in rows}) <= 1:
        on = ours(text, text_pair, return_tensors="np", **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rn = ref(text, text_pair, return_token_type_ids=True, return_tensors="np", **kw)
        for key in rn:
            assert on[key].dtype == np.int32, key
            assert on[key].shape == rn[key].shape, key
            np.testing.assert_array_equal(on[key], rn[key])
    return o


# ---------------------------------------------------------------------------------- tests


def test_vocab_and_special_tokens(toks):
    ours, ref = toks
    assert ours.vocab_size == ref.vocab_size
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.all_special_ids == ref.all_special_ids
    assert ours.all_special_tokens == [str(t) for t in ref.all_special_tokens]
    for name in ("cls", "sep", "pad", "unk", "mask", "bos", "eos"):
        assert getattr(ours, f"{name}_token") == str(getattr(ref, f"{name}_token")), name
        assert getattr(ours, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    for pair in (False, True):
        assert ours.num_special_tokens_to_add(pair) == ref.num_special_tokens_to_add(pair)


def test_missing_special_tokens_are_appended_like_reference(tmp_path):
    vocab = [t for t in TINY_VOCAB if t not in ("<s>", "</s>", "<mask>")]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    ours, ref = load_pair(str(tmp_path))
    assert len(ours) == len(ref)
    assert ours.all_special_ids == ref.all_special_ids
    assert_parity(ours, ref, "<s> hello <mask> world </s>", "the <mask>")


def test_single_texts(toks, sample_texts):
    ours, ref = toks
    for text in HARD_TEXTS + sample_texts[:60]:
        assert_parity(ours, ref, text)
        assert_parity(ours, ref, text, return_offsets_mapping=True, return_special_tokens_mask=True)


def test_pairs(toks, sample_texts):
    ours, ref = toks
    texts = HARD_TEXTS + sample_texts[:30]
    for a, b in zip(texts, texts[1:] + texts[:1], strict=True):
        assert_parity(ours, ref, a, b, return_offsets_mapping=True)
    # empty second segment: a single string with "" behaves like no pair (as in the reference)
    assert_parity(ours, ref, "hello world", "")
    assert_parity(ours, ref, ["hello world", ""], ["", ""])


def test_batches_padded(toks, sample_texts):
    ours, ref = toks
    batch = HARD_TEXTS + sample_texts[:40]
    assert_parity(ours, ref, batch, padding=True, truncation=True, max_length=64)
    assert_parity(ours, ref, batch, padding="longest", return_offsets_mapping=True)
    assert_parity(ours, ref, batch, padding="max_length", truncation=True, max_length=48)
    assert_parity(ours, ref, batch, padding=True, truncation=True, pad_to_multiple_of=8)
    assert_parity(ours, ref, batch, return_length=True, return_special_tokens_mask=True)
    assert_parity(ours, ref, batch[:5], batch[5:10], padding=True)
    # a single string comes back as one row with return_tensors="np"
    assert ours("hello world", return_tensors="np")["input_ids"].shape[0] == 1
    assert_parity(ours, ref, "hello world", padding="max_length", max_length=12)


def test_left_padding_and_truncation(big_vocab_dir, sample_texts):
    ours, ref = load_pair(big_vocab_dir)
    ours.padding_side = ref.padding_side = "left"
    ours.truncation_side = ref.truncation_side = "left"
    assert_parity(ours, ref, sample_texts[:20], padding=True, truncation=True, max_length=32)


@pytest.mark.parametrize("strategy", [True, "longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("max_length", [12, 33, 128])
def test_truncation_strategies(big_toks, long_texts, sample_texts, strategy, max_length):
    ours, ref = big_toks
    # long first segments, then long second segments, then both short
    first = long_texts[:8] + sample_texts[:8] + sample_texts[16:20]
    second = sample_texts[8:16] + long_texts[8:16] + sample_texts[20:24]
    # with "only_*" the other segment must fit, or both refuse the pair
    questions = [q for q in QUESTIONS if len(ref.tokenize(q)) + 3 < max_length]
    singles = list(first)
    if strategy == "only_first":
        second = [questions[i % len(questions)] for i in range(len(first))]
    elif strategy == "only_second":
        first = [questions[i % len(questions)] for i in range(len(second))]
    if strategy == "only_second":  # a single sequence has no second segment to cut
        with pytest.raises(Exception, match="[Ss]econd"):
            ref(singles, truncation=strategy, max_length=max_length)
        with pytest.raises(ValueError, match="[Ss]econd"):
            ours(singles, truncation=strategy, max_length=max_length)
    else:
        assert_parity(ours, ref, singles, truncation=strategy, max_length=max_length)
    assert_parity(ours, ref, first, second, truncation=strategy, max_length=max_length)
    assert_parity(
        ours, ref, first, second, truncation=strategy, max_length=max_length, padding="max_length"
    )
    # max_length alone turns on "longest_first" truncation, as in the reference
    assert_parity(ours, ref, first, second, max_length=max_length)


def test_truncation_uses_model_max_length(big_toks, sample_texts):
    ours, ref = big_toks
    assert ours.model_max_length == ref.model_max_length
    long = [" ".join(sample_texts[:50])]
    assert_parity(ours, ref, long, truncation=True)
    assert_parity(ours, ref, long, padding="max_length", truncation=True)


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
def test_overflow_with_stride(big_toks, long_texts, strategy):
    ours, ref = big_toks
    contexts = long_texts[:6]
    questions = QUESTIONS[:6]
    kw = dict(
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    if strategy != "only_second":  # single sequences: truncating the "second" is an error
        assert_parity(ours, ref, contexts, truncation=strategy, max_length=40, stride=8, **kw)
        assert_parity(ours, ref, contexts[0], truncation=strategy, max_length=40, stride=8, **kw)
    if strategy == "only_first":
        a, b = contexts, questions
    else:
        a, b = questions, contexts
    for padding in (False, True):
        o = assert_parity(
            ours, ref, a, b, truncation=strategy, max_length=64, stride=16, padding=padding, **kw
        )
        assert len(o["overflow_to_sample_mapping"]) > len(a)


def test_hard_text_flags(big_vocab_dir, tiny_vocab_dir):
    for vocab_dir in (big_vocab_dir, tiny_vocab_dir):
        for lower in (True, False):
            for strip in (None, True, False):
                ours, ref = load_pair(vocab_dir, do_lower_case=lower, strip_accents=strip)
                assert_parity(ours, ref, HARD_TEXTS, padding=True, return_offsets_mapping=True)
                assert ours.tokenize(HARD_TEXTS[0]) == ref.tokenize(HARD_TEXTS[0])


def test_tokenize_and_conversions(toks, sample_texts):
    ours, ref = toks
    for text in HARD_TEXTS + sample_texts[:10]:
        tokens = ours.tokenize(text)
        assert tokens == ref.tokenize(text)
        assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.tokenize("a question", "an answer") == ref.tokenize("a question", pair="an answer")
    odd = ["<mask>", "not-a-token-at-all", "##s", "<cls>"]
    assert ours.convert_tokens_to_ids(odd) == ref.convert_tokens_to_ids(odd)
    assert ours.convert_tokens_to_ids("<sep>") == ref.convert_tokens_to_ids("<sep>")
    ids = list(range(min(len(ours), 50)))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert ours.convert_ids_to_tokens(7) == ref.convert_ids_to_tokens(7)


def test_decode(toks, sample_texts):
    ours, ref = toks
    texts = HARD_TEXTS + sample_texts[:30]
    enc = ours(texts, texts[::-1], padding=True)
    for row in enc["input_ids"]:
        for skip in (False, True):
            assert ours.decode(row, skip_special_tokens=skip) == ref.decode(
                row.tolist(), skip_special_tokens=skip
            )
    for skip in (False, True):
        assert ours.batch_decode(enc["input_ids"], skip_special_tokens=skip) == ref.batch_decode(
            enc["input_ids"].tolist(), skip_special_tokens=skip
        )
    rng = np.random.default_rng(1)
    for _ in range(20):
        ids = rng.integers(0, len(ours), size=int(rng.integers(0, 30))).tolist()
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )


@pytest.mark.parametrize("lowercase", [True, False])
def test_save_pretrained_loads_in_transformers(big_vocab_dir, tmp_path, sample_texts, lowercase):
    ours = FunnelTokenizer.from_vocab(os.path.join(big_vocab_dir, "vocab.txt"), lowercase=lowercase)
    ours.model_max_length = 256
    files = ours.save_pretrained(tmp_path)
    names = {os.path.basename(f) for f in files}
    assert names == {
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "FunnelTokenizer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
        fast = FunnelTokenizerFast.from_pretrained(str(tmp_path))
    assert type(auto).__name__ in ("FunnelTokenizer", "FunnelTokenizerFast")
    texts = HARD_TEXTS + sample_texts[:30]
    for ref in (auto, fast):
        assert ref.model_max_length == 256
        assert ref.all_special_ids == ours.all_special_ids
        assert_parity(ours, ref, texts, padding=True, truncation=True, return_offsets_mapping=True)
        assert_parity(ours, ref, texts, texts[::-1], truncation="longest_first", max_length=40)
        ids = ours(texts[0])["input_ids"][0].tolist()
        assert ours.decode(ids) == ref.decode(ids)
    # The reference built from vocab.txt alone (with the same flags) agrees with the saved one.
    os.remove(tmp_path / "tokenizer.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_vocab_only = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert_parity(ours, from_vocab_only, HARD_TEXTS, padding=True)


def test_from_pretrained_round_trips(big_vocab_dir, tmp_path, sample_texts):
    texts = HARD_TEXTS + sample_texts[:20]
    for lowercase in (True, False):
        ours, ref = load_pair(big_vocab_dir, do_lower_case=lowercase)
        # our own save directory
        ours.save_pretrained(tmp_path / f"ours{lowercase}")
        back = FunnelTokenizer.from_pretrained(tmp_path / f"ours{lowercase}")
        assert back.do_lower_case == lowercase
        assert_parity(back, ref, texts, padding=True, return_offsets_mapping=True)
        # a directory written by transformers (tokenizer.json + tokenizer_config.json)
        ref.save_pretrained(str(tmp_path / f"ref{lowercase}"))
        from_ref = FunnelTokenizer.from_pretrained(tmp_path / f"ref{lowercase}")
        assert from_ref.model_max_length == ref.model_max_length
        assert_parity(from_ref, ref, texts, padding=True, return_offsets_mapping=True)
        # vocab.txt + tokenizer_config.json only
        vocab_dir = tmp_path / f"vocab{lowercase}"
        vocab_dir.mkdir()
        shutil.copy(os.path.join(big_vocab_dir, "vocab.txt"), vocab_dir / "vocab.txt")
        shutil.copy(tmp_path / f"ref{lowercase}" / "tokenizer_config.json", vocab_dir)
        assert_parity(FunnelTokenizer.from_pretrained(vocab_dir), ref, texts, padding=True)


def _reference_specials() -> list[str]:
    """The reference's default vocabulary: its special tokens in id order."""
    try:
        default_vocab = FunnelTokenizerFast().get_vocab()
    except Exception:  # transformers 4.x cannot build one without a vocab file
        return ["<pad>", "<unk>", "<cls>", "<sep>", "<mask>", "<s>", "</s>"]
    return [t for t, _ in sorted(default_vocab.items(), key=lambda kv: kv[1])]


def _vocab_distance(a: dict, b: dict) -> int:
    return len(set(a) ^ set(b))


# tokenizers' WordPiece trainer breaks frequency ties in hash-map order, so two runs on the same
# text differ in a few dozen of 4000 entries (measured: 10-30); a different normalizer
# (e.g. cased instead of lowercased) changes ~2000.
_TRAIN_NOISE = 120


def test_train_matches_tokenizers_wordpiece(corpus):
    """`train` gives the vocabulary tokenizers' own BERT WordPiece recipe gives."""
    from tokenizers.implementations import BertWordPieceTokenizer

    texts = corpus[:3000]
    specials = _reference_specials()
    expected = BertWordPieceTokenizer(lowercase=True, unk_token=specials[1])
    expected.train_from_iterator(
        texts,
        vocab_size=4000,
        min_frequency=2,
        limit_alphabet=1000,
        special_tokens=specials,
        show_progress=False,
    )
    ours = FunnelTokenizer.train(texts, 4000, lowercase=True, min_frequency=2, limit_alphabet=1000)
    assert ours.vocab_size == expected.get_vocab_size()
    assert _vocab_distance(ours.get_vocab(), expected.get_vocab()) <= _TRAIN_NOISE
    assert ours.convert_ids_to_tokens(list(range(len(specials)))) == specials
    cased = FunnelTokenizer.train(texts, 4000, lowercase=False, limit_alphabet=1000)
    assert _vocab_distance(cased.get_vocab(), expected.get_vocab()) > 5 * _TRAIN_NOISE


@pytest.mark.parametrize("lowercase", [True, False])
def test_train_uses_reference_normalization(corpus, tiny_vocab_dir, lowercase):
    """Every trained WordPiece is a piece of a word as the reference normalizes and splits text."""
    texts = HARD_TEXTS * 3 + corpus[:400]
    ours = FunnelTokenizer.train(texts, 2000, lowercase=lowercase, min_frequency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = FunnelTokenizerFast.from_pretrained(tiny_vocab_dir, do_lower_case=lowercase)
    norm, pre = ref.backend_tokenizer.normalizer, ref.backend_tokenizer.pre_tokenizer
    words = {w for t in texts for w, _ in pre.pre_tokenize_str(norm.normalize_str(t))}
    starts = {w[:i] for w in words for i in range(1, len(w) + 1)}
    inner = {w[i:j] for w in words for i in range(1, len(w)) for j in range(i + 1, len(w) + 1)}
    chars = {c for w in words for c in w}
    specials = set(_reference_specials())
    for token in ours.get_vocab():
        if token in specials:
            continue
        piece = token[2:] if token.startswith("##") else token
        if len(piece) == 1:  # the trainer's alphabet: every character seen
            assert piece in chars, token
        elif token.startswith("##"):
            assert piece in inner, token
        else:
            assert token in starts, token
    assert ("é" in ours.get_vocab()) == (not lowercase)  # accents stripped with lowercasing


def test_train_from_files(tmp_path, corpus):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus[:2000]), encoding="utf-8")
    from_file = FunnelTokenizer.train(str(path), 3000)
    from_lines = FunnelTokenizer.train(path.read_text(encoding="utf-8").split("\n"), 3000)
    assert from_file.vocab_size == from_lines.vocab_size
    assert _vocab_distance(from_file.get_vocab(), from_lines.get_vocab()) <= _TRAIN_NOISE
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        FunnelTokenizer.train(tmp_path / "missing.txt", 3000)


# ---------------------------------------------------------------------------------- errors


def test_missing_or_empty_vocab(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FunnelTokenizer.from_vocab(missing)
    with pytest.raises(OSError):  # the reference fails too
        FunnelTokenizerFast.from_pretrained(str(tmp_path / "nope"), local_files_only=True)
    empty = tmp_path / "vocab.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}.*empty"):
        FunnelTokenizer.from_vocab(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        FunnelTokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="vocab.txt"):
        FunnelTokenizer.from_pretrained(tmp_path / "other")


@pytest.mark.parametrize(
    "bad, type_name",
    [(123, "int"), (None, "NoneType"), (b"bytes", "bytes"), (["fine", 4.5], "float")],
)
def test_non_string_input(toks, bad, type_name):
    ours, ref = toks
    with pytest.raises((ValueError, TypeError)):  # the reference rejects it as well
        ref(bad)
    with pytest.raises(TypeError, match=type_name):
        ours(bad)
    if bad is not None:  # text_pair=None means "no pair"
        bad_pair = bad if not isinstance(bad, list) else 7.5
        with pytest.raises(TypeError, match=type(bad_pair).__name__):
            ours("fine", bad_pair)


def test_max_length_too_small_for_special_tokens(toks):
    ours, ref = toks
    for pair, n_special in ((None, ref.num_special_tokens_to_add(False)), ("b c", None)):
        if n_special is None:
            n_special = ref.num_special_tokens_to_add(True)
        with pytest.raises(ValueError, match=rf"max_length={n_special - 1}.*\b{n_special}\b"):
            ours("hello world the a", pair, truncation=True, max_length=n_special - 1)
        # exactly enough room is fine, and matches the reference
        assert_parity(ours, ref, "hello world the a", pair, truncation=True, max_length=n_special)


def test_stride_too_large(big_toks):
    ours, ref = big_toks
    text = "hello world " * 40
    kw = dict(truncation=True, max_length=10, stride=8, return_overflowing_tokens=True)
    with pytest.raises(BaseException, match="stride"):  # the reference panics in tokenizers
        ref(text, **kw)
    with pytest.raises(ValueError, match="stride=8"):
        ours(text, **kw)


def test_bad_options(toks):
    ours, ref = toks
    with pytest.raises(ValueError):
        ref(["a", "b"], padding="sideways")
    with pytest.raises(ValueError, match="padding"):
        ours(["a", "b"], padding="sideways")
    with pytest.raises(ValueError, match="truncation"):
        ours(["a", "b"], truncation="middle", max_length=5)
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "hello world the"], return_tensors="np")  # ragged
    with pytest.raises(ValueError, match="text_pair has 1"):
        ours(["a", "b"], ["c"])


def test_return_tensors_jax(big_toks, sample_texts):
    jnp = pytest.importorskip("jax.numpy")
    ours, ref = big_toks
    enc = ours(sample_texts[:8], sample_texts[8:16], padding=True, return_tensors="jax")
    expected = ref(
        sample_texts[:8],
        sample_texts[8:16],
        padding=True,
        return_tensors="np",
        return_token_type_ids=True,
    )
    for key in expected:
        assert isinstance(enc[key], jnp.ndarray), key
        np.testing.assert_array_equal(np.asarray(enc[key]), expected[key])
