"""Pretraining data: streaming corpus reading, an embedded default corpus, sentence splitting,
and packing into `<cls> A <sep> B <sep>` examples. funnel_jax/prepare.py runs these offline into
ArrayRecord shards and funnel_jax/loader.py reads the batches; every pretraining run takes that
one path (funnel_jax/training/pretrain_data.py).

    for doc in iter_documents(["books/", "wiki.jsonl.zst"]):   # Document(text, path, line)
        ...
    token_docs = tokenize_documents(tok, texts)       # [doc][sentence] -> np.int32 ids
    examples = pack_examples(token_docs, rng, seq_len=128, special=SpecialIds.from_tokenizer(tok),
                             truncate_stride=truncation_stride(config), rng=rng)

Packing follows the original pipeline (tensorflow/create_pretrain_data.py and
input_func_builder.py): the documents of an epoch, in a seeded random order, form one token
stream with sentence boundaries; A is a run of whole sentences from the current position; B is
the following sentences, or (with probability `random_next_prob`, and always when A has no
sentence boundary) a run of sentences from a random place of the stream; both are trimmed to
fit (A from the right, B from either end). Token types: `<cls>` 2, A and its `<sep>` 0, B and
its `<sep>` 1. With `truncate_seq` (and separate_cls) the model drops tokens at the end when it
pools, so, as the original does, the content is shortened by `2**(n_blocks-1) - 1` tokens and the
example ends with that many pads (`truncation_stride`). Padding has attention_mask 0 and type 0.

The default corpus, `stdlib_corpus()`, is the docstrings of the Python standard library and the
`pydoc_data` help topics: real English text present on every Python install. It is collected in a
child interpreter (isolated mode), so that importing ~500 modules leaves no trace in the caller.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

CLS_TYPE_ID, A_TYPE_ID, B_TYPE_ID, PAD_TYPE_ID = 2, 0, 1, 0
JSONL_SUFFIXES = (".jsonl", ".json")

# --------------------------------------------------------------------------- corpus reading


class CorpusError(ValueError):
    """A corpus input that cannot be used; the message names the file (and line)."""


def _expand_corpus_paths(paths, patterns: Sequence[str], none_found: str) -> list[Path]:
    """Files as given, directories to the files below them matching `patterns` (recursively,
    sorted); `none_found` ends the error of a directory without any."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CorpusError("no corpus path given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted({q for n in patterns for q in p.rglob(n) if q.is_file()})
            if not found:
                raise CorpusError(f"{p}: directory holds no {none_found}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise CorpusError(f"{p}: neither a regular file nor a directory")
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")
    return files


# --------------------------------------------------------------------------- streaming


COMPRESSED_SUFFIXES = (".gz", ".zst")
STREAM_SUFFIXES = (".txt", *JSONL_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a streamed corpus: its text (one line per sentence or paragraph) and
    where it starts (`path:line`, for error messages)."""

    text: str
    path: str
    line: int


def _stream_kind(path: Path) -> tuple[str, str]:
    """(format, compression) of a corpus file: format "jsonl" or "text", compression "", "gz"
    or "zst" (by suffix: `x.jsonl.gz` is compressed JSON Lines)."""
    suffixes = [q.lower() for q in path.suffixes]
    comp = suffixes[-1][1:] if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES else ""
    inner = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    return ("jsonl" if inner in JSONL_SUFFIXES else "text"), comp


def stream_corpus_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand corpus arguments for streaming: files as given, directories to every *.txt,
    *.jsonl, *.json file below them and the .gz / .zst compressed versions of each
    (recursively, sorted)."""
    names = [f"*{s}" for s in STREAM_SUFFIXES]
    names += [f"*{s}{c}" for s in STREAM_SUFFIXES for c in COMPRESSED_SUFFIXES]
    return _expand_corpus_paths(
        paths,
        names,
        "*.txt / *.jsonl / *.json file (nor .gz / .zst of them; searched recursively)",
    )


def _open_binary(path: Path, comp: str):
    import io

    try:
        raw = open(path, "rb")  # closed through the returned wrapper
    except OSError as e:
        raise CorpusError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if comp == "gz":
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if comp == "zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def _file_lines(path: Path, comp: str):
    """(line number, text) of each line, decoded as UTF-8 one line at a time."""
    try:
        f = _open_binary(path, comp)
        with f:
            for lineno, raw in enumerate(f, 1):
                nul = raw.find(b"\x00")
                if nul >= 0:
                    raise CorpusError(
                        f"{path}:{lineno}: not a text file (NUL byte at column {nul + 1}); "
                        "expected UTF-8 text"
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{path}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})"
                    ) from None
                if lineno == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                yield lineno, line
    except CorpusError:
        raise
    except Exception as e:  # gzip / zstandard decoding errors have their own types
        if not comp and not isinstance(e, OSError):
            raise
        kind = {"gz": "gzip", "zst": "zstandard"}.get(comp, "")
        what = f"not a valid {kind} file" if kind else "cannot read the file"
        raise CorpusError(f"{path}: {what} ({e})") from None


def iter_documents(paths: str | os.PathLike | Sequence[str | os.PathLike]):
    """Stream the documents (`Document`) of text files, JSON Lines files (one object with a
    "text" field a line) and their .gz / .zst versions, directories of them, one line at a time:
    memory is bounded by the longest document, not by the corpus. Text files: blank lines
    separate documents. Errors (CorpusError) name the file and line."""
    for f in stream_corpus_files(paths):
        fmt, comp = _stream_kind(f)
        count = 0
        if fmt == "jsonl":
            for lineno, line in _file_lines(f, comp):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    got = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(obj)}"
                    raise CorpusError(
                        f'{f}:{lineno}: expected a JSON object with a string field "text", '
                        f"got {got}"
                    )
                if obj["text"].strip():
                    count += 1
                    yield Document(obj["text"], str(f), lineno)
            if not count:
                raise CorpusError(f'{f}: no line has a non-empty "text" field')
            continue
        cur: list[str] = []
        start = 0
        for lineno, line in _file_lines(f, comp):
            line = line.strip()
            if line:
                if not cur:
                    start = lineno
                cur.append(line)
            elif cur:
                count += 1
                yield Document("\n".join(cur), str(f), start)
                cur = []
        if cur:
            count += 1
            yield Document("\n".join(cur), str(f), start)
        if not count:
            raise CorpusError(f"{f}: the file is empty")


# --------------------------------------------------------------------------- sentences

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\)\]]*\s+(?=[\"'\(\[]?[A-Z0-9])")
_WS = re.compile(r"\s+")


def split_sentences(document: str) -> list[str]:
    """Sentences of a document: each line is split after `.`, `!` or `?` followed by a space and
    an upper-case letter or a digit. Empty pieces are dropped."""
    out = []
    for line in document.splitlines():
        line = _WS.sub(" ", line).strip()
        if not line:
            continue
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return out


# --------------------------------------------------------------------------- stdlib corpus

# Modules never imported: side effects (antigravity opens a browser, this prints), GUI and
# IDE packages, the test suites, platform modules that only fail, and pydoc_data (read apart).
STDLIB_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "msilib",
        "msvcrt",
        "winreg",
        "winsound",
        "nt",
    }
)

_STDLIB_SCRIPT = r"""
import contextlib, importlib, inspect, io, json, pkgutil, sys, warnings
skip = set(json.loads(sys.argv[2]))

def bad(name):
    parts = name.split(".")
    return parts[0] in skip or any(p.startswith(("_", "test")) for p in parts)

def member_docs(mod, name):
    out = []
    if isinstance(mod.__doc__, str):
        out.append(inspect.cleandoc(mod.__doc__))
    for key, value in sorted(vars(mod).items()):
        if key.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        doc = getattr(value, "__doc__", None)
        if isinstance(doc, str):
            out.append(inspect.cleandoc(doc))
        if inspect.isclass(value):
            for k2, v2 in sorted(vars(value).items()):
                if k2.startswith("_"):
                    continue
                if inspect.isfunction(v2) or isinstance(v2, (property, classmethod, staticmethod)):
                    d2 = getattr(v2, "__doc__", None)
                    if isinstance(d2, str):
                        out.append(inspect.cleandoc(d2))
    return out

names = [n for n in sorted(sys.stdlib_module_names) if not bad(n)]
docs, seen = [], set()
with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
        contextlib.redirect_stderr(io.StringIO()):
    warnings.simplefilter("ignore")
    i = 0
    while i < len(names):
        name = names[i]
        i += 1
        if name in seen:
            continue
        seen.add(name)
        try:
            mod = importlib.import_module(name)
        except BaseException:
            continue
        texts = member_docs(mod, name)
        if texts:
            docs.append(texts)
        if hasattr(mod, "__path__"):
            subs = sorted(m.name for m in pkgutil.iter_modules(mod.__path__, name + "."))
            names[i:i] = [s for s in subs if not bad(s)]
    try:
        from pydoc_data.topics import topics
        docs.extend([topics[k]] for k in sorted(topics))
    except BaseException:
        pass
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(docs, f)
"""


def _reflow(texts: Iterable[str]) -> str:
    """Docstrings -> one paragraph a line: hard-wrapped lines joined, code and doctest lines,
    tables and very short fragments dropped."""
    paragraphs = []
    for text in texts:
        for block in re.split(r"\n\s*\n", text):
            lines = [ln for ln in block.splitlines() if ln.strip()]
            if not lines:
                continue
            if any(
                ln.lstrip().startswith((">>>", "...", "$ ", "+--", "===", "---")) for ln in lines
            ):
                continue
            if all(ln.startswith((" ", "\t")) for ln in lines):  # an indented (code) block
                continue
            para = _WS.sub(" ", " ".join(ln.strip() for ln in lines)).strip()
            words = para.split()
            letters = sum(c.isalpha() for c in para)
            if len(words) >= 4 and letters >= 0.6 * len(para.replace(" ", "")):
                paragraphs.append(para)
    return "\n".join(paragraphs)


@functools.lru_cache(maxsize=1)
def _stdlib_corpus_cached(executable: str) -> tuple[str, ...]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "docs.json")
        cmd = [executable, "-I", "-c", _STDLIB_SCRIPT, out, json.dumps(sorted(STDLIB_SKIP))]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=600,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError("collecting the standard-library docstrings timed out") from None
        if proc.returncode != 0 or not os.path.exists(out):
            err = proc.stderr.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"collecting the standard-library docstrings failed:\n{err}")
        with open(out, encoding="utf-8") as f:
            raw = json.load(f)
    docs = [_reflow(texts) for texts in raw]
    return tuple(d for d in docs if d)


def stdlib_corpus() -> list[str]:
    """The embedded default corpus: one document per standard-library module (its docstring and
    those of its public classes, functions and methods) and per `pydoc_data` help topic; one
    paragraph a line. Deterministic for a given Python install; cached for the process."""
    return list(_stdlib_corpus_cached(sys.executable))


# --------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int
    all: tuple[int, ...]  # every special id (never a masking target, never a random token)
    vocab_size: int

    @classmethod
    def from_tokenizer(cls, tok, vocab_size: int | None = None) -> SpecialIds:
        ids = {
            "cls": tok.cls_token_id,
            "sep": tok.sep_token_id,
            "pad": tok.pad_token_id,
            "mask": tok.mask_token_id,
        }
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ValueError(f"the tokenizer has no id for the special token(s) {missing}")
        all_ids = tuple(sorted({int(i) for i in tok.all_special_ids if i is not None}))
        return cls(
            **{k: int(v) for k, v in ids.items()},
            all=all_ids,
            vocab_size=int(vocab_size if vocab_size is not None else len(tok)),
        )


def validate_token_ids(ids: np.ndarray, vocab_size: int, where: str = "input") -> None:
    """Raise if any id is outside [0, vocab_size)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size}); the tokenizer "
            "and the model's vocab_size do not match"
        )


def tokenize_documents(
    tok, documents: Sequence[str], vocab_size: int | None = None, batch: int = 4096
) -> list[list[np.ndarray]]:
    """[doc][sentence] -> int32 WordPiece ids (no special tokens); empty sentences and
    documents are dropped; ids are checked against vocab_size (default: len(tok))."""
    vocab_size = int(vocab_size if vocab_size is not None else len(tok))
    sentences, owner = [], []
    for d, doc in enumerate(documents):
        for s in split_sentences(doc):
            sentences.append(s)
            owner.append(d)
    ids: list[list[int]] = []
    for start in range(0, len(sentences), batch):
        chunk = sentences[start : start + batch]
        enc = tok(chunk, add_special_tokens=False, return_tensors=None)["input_ids"]
        ids.extend(enc)
    out: list[list[np.ndarray]] = [[] for _ in documents]
    for d, seq in zip(owner, ids, strict=True):
        if seq:
            out[d].append(np.asarray(seq, np.int32))
    out = [doc for doc in out if doc]
    if out:
        validate_token_ids(np.concatenate([np.concatenate(d) for d in out]), vocab_size, "corpus")
    return out


def truncation_stride(config) -> int:
    """2**(n_blocks-1) when the model truncates at pooling (separate_cls and truncate_seq),
    else 1: the example ends with `stride - 1` pads, as in the original input pipeline."""
    if config.separate_cls and config.truncate_seq and config.num_blocks > 1:
        return 2 ** (config.num_blocks - 1)
    return 1


# --------------------------------------------------------------------------- packing


def _shrink_b(rng, n, b_begin, b_end):
    k = int(rng.binomial(n, 0.5)) if n > 0 else 0
    return b_begin + (n - k), b_end - k


def pack_examples(
    documents: Sequence[Sequence[np.ndarray]],
    rng: np.random.Generator,
    seq_len: int,
    special: SpecialIds,
    truncate_stride: int = 1,
    random_next_prob: float = 0.5,
    shuffle_documents: bool = True,
) -> dict[str, np.ndarray]:
    """All examples of one pass over `documents`: dict of int32 [N, seq_len] arrays
    (input_ids, token_type_ids, attention_mask) and int32 [N] `random_next` (1: B is random)."""
    content = seq_len - 3 - (truncate_stride - 1)  # tokens of A + B
    if content < 2:
        raise ValueError(
            f"seq_len={seq_len} leaves {content} tokens for the two segments (3 special tokens "
            f"and {truncate_stride - 1} pads for pooling); use a longer seq_len"
        )
    order = rng.permutation(len(documents)) if shuffle_documents else np.arange(len(documents))
    pieces, starts = [], []
    for d in order:
        for sent in documents[d]:
            pieces.append(sent)
            flags = np.zeros(len(sent), bool)
            flags[0] = True
            starts.append(flags)
    if not pieces:
        raise ValueError("no tokens to pack: the corpus is empty after tokenization")
    tokens = np.concatenate(pieces).astype(np.int32)
    bounds = np.flatnonzero(np.concatenate(starts))  # first token of every sentence
    n = len(tokens)

    rows_a, rows_b, randoms = [], [], []
    i = 0
    while i < n:
        lo = np.searchsorted(bounds, i, side="right")
        hi = np.searchsorted(bounds, i + content, side="left")
        cut_points = bounds[lo:hi]
        end = int(bounds[hi]) if hi < len(bounds) else n
        if len(cut_points) == 0 or rng.random() < random_next_prob:
            a_end = int(rng.choice(cut_points)) if len(cut_points) else end
            b_len = max(1, content - (a_end - i))
            b_len = min(b_len, n)
            b_begin = int(rng.integers(0, n - b_len + 1))
            b_end = b_begin + b_len
            # Whole sentences for B.
            k = np.searchsorted(bounds, b_begin, side="right") - 1
            b_begin = int(bounds[k]) if k >= 0 else 0
            k = np.searchsorted(bounds, b_end, side="left")
            b_end = int(bounds[k]) if k < len(bounds) else n
            new_begin, is_random = a_end, 1
        else:
            a_end = int(rng.choice(cut_points))
            b_begin, b_end = a_end, end
            new_begin, is_random = end, 0
        la, lb = a_end - i, b_end - b_begin
        excess = la + lb - content
        if excess > 0:  # A loses tokens on the right, B on either end, the longer one first
            if la > lb:
                d = min(la - lb, excess)
                la, excess = la - d, excess - d
            elif lb > la:
                d = min(lb - la, excess)
                b_begin, b_end = _shrink_b(rng, d, b_begin, b_end)
                excess -= d
            if excess > 0:
                la -= excess // 2
                b_begin, b_end = _shrink_b(rng, (excess + 1) // 2, b_begin, b_end)
        rows_a.append(tokens[i : i + la])
        rows_b.append(tokens[b_begin:b_end])
        randoms.append(is_random)
        i = new_begin

    num = len(rows_a)
    input_ids = np.full((num, seq_len), special.pad, np.int32)
    token_type_ids = np.full((num, seq_len), PAD_TYPE_ID, np.int32)
    attention_mask = np.zeros((num, seq_len), np.int32)
    for r, (a, b) in enumerate(zip(rows_a, rows_b, strict=True)):
        row = np.concatenate([[special.cls], a, [special.sep], b, [special.sep]])
        types = np.concatenate(
            [[CLS_TYPE_ID], np.full(len(a) + 1, A_TYPE_ID), np.full(len(b) + 1, B_TYPE_ID)]
        )
        input_ids[r, : len(row)] = row
        token_type_ids[r, : len(row)] = types
        attention_mask[r, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "random_next": np.asarray(randoms, np.int32),
    }
