"""Offline preparation of a pretraining corpus into ArrayRecord shards (read by
funnel_jax/loader.py), as the original's tensorflow/create_pretrain_data.py does for TFRecords.

    manifest = prepare_corpus(["wiki/"], "data/wiki-128", seq_len=128, tokenizer="tok/",
                              workers=8, num_shards=64, truncate_stride=4)

The corpus is streamed (`data.iter_documents`: text files, JSON Lines, .gz / .zst, directories)
and cut into chunks of whole documents of about `chunk_chars` characters. Worker processes (one
tokenizer each) split a chunk's documents into sentences, tokenize them, hold out the documents
of the eval split (a seeded hash of the document's index: the same documents for every worker
count) and pack each split's documents with `data.pack_examples` (`<cls> A <sep> B <sep>`, token
types 2/0/1, random B segments from the same chunk, the truncate_seq stride) with the generator
`np.random.default_rng([seed, chunk, split, slice])`. The main process writes the examples in chunk
order, chunk k of the train split to shard k % num_shards, so the output is byte-identical for any
number of workers. At most 2 x workers chunks are in flight: memory does not grow with the corpus.

A record is one example without its padding: `[len(A), random_next, <cls>, A..., <sep>, B...,
<sep>]` as uint16 (uint32 when the vocabulary has more than 65,536 tokens); `decode_records` turns
records back into the padded int32 arrays of `data.pack_examples`.

The output directory holds `manifest.json` (format, seq_len, dtype, the splits with their shards,
record and token counts, the tokenizer's SHA-256, the packing settings and the request), the
shards, and `tokenizer/` (a `FunnelTokenizer.save_pretrained` directory). It is written into the
sibling `.NAME.partial` and renamed at the end: a killed run leaves no `NAME` behind (the next run
removes the partial one and starts again), and a rerun on a complete `NAME` with the same request
does nothing.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from funnel_jax import data as data_lib

FORMAT = "funnel-jax-prepared/1"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "eval")
# Shards are read one record at a time in shuffled order: no grouping, no compression.
WRITER_OPTIONS = "group_size:1,uncompressed"

__all__ = [
    "FORMAT",
    "MANIFEST",
    "PrepareError",
    "decode_records",
    "encode_examples",
    "merge_prepared",
    "prepare_corpus",
    "read_manifest",
    "tokenizer_sha256",
    "write_corpus_file",
]


class PrepareError(ValueError):
    """A preparation request that cannot be carried out (the message says what and where)."""


# --------------------------------------------------------------------------- records


def record_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_examples(examples: dict[str, np.ndarray], dtype: str) -> list[bytes]:
    """Records of the examples of `data.pack_examples` (dict of [N, L] arrays + [N] random_next):
    each `[len(A), random_next, <cls>, A, <sep>, B, <sep>]` (the non-padding tokens) as bytes."""
    ids, types, mask = examples["input_ids"], examples["token_type_ids"], examples["attention_mask"]
    lengths = mask.sum(axis=1)
    len_a = ((types == data_lib.A_TYPE_ID) & (mask == 1)).sum(axis=1) - 1  # A and its <sep>
    out = []
    for r in range(len(ids)):
        n = int(lengths[r])
        rec = np.empty(n + 2, dtype)
        rec[0], rec[1] = len_a[r], examples["random_next"][r]
        rec[2:] = ids[r, :n]
        out.append(rec.tobytes())
    return out


def decode_records(
    records: Sequence[bytes], seq_len: int, dtype: str, pad_id: int
) -> dict[str, np.ndarray]:
    """Records -> dict of int32 input_ids, token_type_ids, attention_mask [N, seq_len] and
    random_next [N], the arrays `data.pack_examples` gave before encoding."""
    n = len(records)
    input_ids = np.full((n, seq_len), pad_id, np.int32)
    len_a = np.empty(n, np.int64)
    random_next = np.empty(n, np.int32)
    lengths = np.empty(n, np.int64)
    for r, rec in enumerate(records):
        arr = np.frombuffer(rec, dtype)
        k = len(arr) - 2
        if k > seq_len or k < 3:
            raise ValueError(
                f"a record holds {k} tokens, outside [3, seq_len={seq_len}]: the shards do not "
                "belong to this manifest"
            )
        len_a[r], random_next[r], lengths[r] = arr[0], arr[1], k
        input_ids[r, :k] = arr[2:]
    pos = np.arange(seq_len)[None, :]
    inside = pos < lengths[:, None]
    token_type_ids = np.where(
        pos == 0,
        data_lib.CLS_TYPE_ID,
        np.where(pos < len_a[:, None] + 2, data_lib.A_TYPE_ID, data_lib.B_TYPE_ID),
    )
    token_type_ids = np.where(inside, token_type_ids, data_lib.PAD_TYPE_ID).astype(np.int32)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": inside.astype(np.int32),
        "random_next": random_next,
    }


def write_corpus_file(documents: Sequence[str], path: str | os.PathLike) -> Path:
    """Write in-memory documents (e.g. `data.stdlib_corpus()`) as a text corpus file that
    `data.iter_documents` reads back as the same documents: lines stripped, blank lines dropped
    inside a document, one blank line between documents. Written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            lines = [ln.strip() for ln in doc.splitlines() if ln.strip()]
            if lines:
                f.write("\n".join(lines) + "\n\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- manifest


def tokenizer_sha256(directory: str | os.PathLike) -> str:
    """SHA-256 over the names and bytes of the files of a tokenizer directory (sorted)."""
    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a prepared directory; raises with the path when it is missing or not one."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        partial = Path(directory).parent / f".{Path(directory).name}.partial"
        hint = (
            f" ({partial} exists: the preparation was interrupted; rerun it)"
            if partial.exists()
            else " (prepare it with python -m experiments.prepare_data)"
        )
        raise FileNotFoundError(f"{path}: no prepared data here{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepareError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PrepareError(f"{path}: format {got!r}, expected {FORMAT!r}")
    return manifest


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- tokenization

# BertPreTokenizer on ASCII text: split at whitespace (Rust's char::is_whitespace) and isolate
# every ASCII punctuation character.
_ASCII_PUNCT = r"!-/:-@\[-`{-~"
_ASCII_WORD = re.compile(rf"[^ \t\n\r\x0b\x0c{_ASCII_PUNCT}]+|[{_ASCII_PUNCT}]")
# BertNormalizer's clean_text on ASCII: NUL and the other control characters are dropped,
# tab / newline / carriage return become spaces.
_ASCII_CLEAN = {c: None for c in (*range(0, 9), 11, 12, *range(14, 32), 127)}
_ASCII_CLEAN.update({9: " ", 10: " ", 13: " "})


class SentenceEncoder:
    """WordPiece ids of sentences, equal to `tok(sentences, add_special_tokens=False)` but about
    three times faster on mostly-ASCII text: ASCII sentences are normalized and split into words
    in Python (the rules of BertNormalizer and BertPreTokenizer restricted to ASCII) and each
    distinct word is looked up once in the WordPiece model (a cache); other sentences, and any
    sentence holding a special token's text, go through the tokenizer. A tokenizer whose
    pipeline is not BertNormalizer + BertPreTokenizer + WordPiece always goes through it."""

    def __init__(self, tok, cache_size: int = 1 << 20):
        self.tok = tok
        self.backend = tok.backend_tokenizer
        cfg = json.loads(self.backend.to_str())
        norm, pre, model = cfg.get("normalizer") or {}, cfg.get("pre_tokenizer") or {}, cfg["model"]
        self.fast = (
            norm.get("type") == "BertNormalizer"
            and pre.get("type") == "BertPreTokenizer"
            and model.get("type") == "WordPiece"
        )
        self.lowercase = bool(norm.get("lowercase"))
        self.clean = bool(norm.get("clean_text"))
        self.specials = tuple(a["content"] for a in cfg.get("added_tokens", []))
        self.cache: dict[str, list[int]] = {}
        self.cache_size = cache_size

    def _slow(self, sentences: list[str]) -> list[list[int]]:
        if not sentences:
            return []
        return [e.ids for e in self.backend.encode_batch_fast(sentences, add_special_tokens=False)]

    def __call__(self, sentences: list[str]) -> list[list[int]]:
        if not self.fast:
            return self._slow(sentences)
        out: list[list[int] | None] = [None] * len(sentences)
        fast_at: list[int] = []
        fast_words: list[list[str]] = []
        slow_at: list[int] = []
        for i, s in enumerate(sentences):
            if not s.isascii() or ("<" in s and any(t in s for t in self.specials)):
                slow_at.append(i)
                continue
            if self.clean:
                s = s.translate(_ASCII_CLEAN)
            if self.lowercase:
                s = s.lower()
            fast_at.append(i)
            fast_words.append(_ASCII_WORD.findall(s))
        # Distinct new words go through the WordPiece model once; then every sentence is a
        # chain of cache look-ups (C-level iteration: no Python loop per word).
        cache = self.cache
        new = set().union(*fast_words) - cache.keys()
        if len(cache) + len(new) > self.cache_size:
            cache.clear()
            new = set().union(*fast_words)
        model = self.backend.model
        for w in new:
            cache[w] = [t.id for t in model.tokenize(w)]
        lookup, chain = cache.__getitem__, itertools.chain.from_iterable
        for i, words in zip(fast_at, fast_words, strict=True):
            out[i] = list(chain(map(lookup, words)))
        for i, ids in zip(slow_at, self._slow([sentences[i] for i in slow_at]), strict=True):
            out[i] = ids
        return out  # type: ignore[return-value]


def tokenize_documents(encoder: SentenceEncoder, documents: Sequence[str]):
    """`data.tokenize_documents` with a SentenceEncoder: [doc][sentence] -> int32 ids, empty
    sentences and documents dropped."""
    sentences, owner = [], []
    for d, doc in enumerate(documents):
        for s in data_lib.split_sentences(doc):
            sentences.append(s)
            owner.append(d)
    out: list[list[np.ndarray]] = [[] for _ in documents]
    for d, seq in zip(owner, encoder(sentences), strict=True):
        if seq:
            out[d].append(np.asarray(seq, np.int32))
    return [doc for doc in out if doc]


# --------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_dir: str, settings: dict[str, Any]) -> None:
    # One tokenizer per process, used from one thread: no nested Rust thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from funnel_jax.tokenizer import FunnelTokenizer

    tok = FunnelTokenizer.from_pretrained(tokenizer_dir)
    _WORKER.update(
        tok=tok,
        encoder=SentenceEncoder(tok),
        special=data_lib.SpecialIds.from_tokenizer(tok),
        dtype=record_dtype(len(tok)),
        **settings,
    )


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def is_eval_document(doc_index: int, seed: int, eval_fraction: float) -> bool:
    """Whether document `doc_index` (0-based, in corpus order) belongs to the held-out split."""
    if eval_fraction <= 0:
        return False
    return _mix64(_mix64(seed) ^ doc_index) < eval_fraction * 2.0**64


def _pack_chunk(task: tuple[int, int, list[str]]) -> dict[str, Any]:
    """Worker: (chunk index, index of its first document, texts) -> records per split."""
    chunk, first_doc, texts = task
    w = _WORKER
    cpu0 = time.process_time()
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for i, text in enumerate(texts):
        held = is_eval_document(
            first_doc + i, w["seed"] + (w["slice_index"] << 32), w["eval_fraction"]
        )
        split = "eval" if held else "train"
        by_split[split].append(text)
    out: dict[str, Any] = {"chunk": chunk, "documents": len(texts), "corpus_tokens": 0}
    for s_i, split in enumerate(SPLITS):
        docs = tokenize_documents(w["encoder"], by_split[split])
        n_tok = sum(len(sent) for d in docs for sent in d)
        out["corpus_tokens"] += n_tok
        records: list[bytes] = []
        tokens = 0
        if n_tok:
            examples = data_lib.pack_examples(
                docs,
                np.random.default_rng([w["seed"], chunk, s_i, w["slice_index"]]),
                w["seq_len"],
                w["special"],
                truncate_stride=w["truncate_stride"],
                random_next_prob=w["random_next_prob"],
            )
            records = encode_examples(examples, w["dtype"])
            tokens = int(examples["attention_mask"].sum())
        out[split] = {"records": records, "tokens": tokens, "documents": len(by_split[split])}
    out["cpu_seconds"] = time.process_time() - cpu0
    return out


def _chunks(docs: Iterator[data_lib.Document], chunk_chars: int):
    """(chunk index, first document index, texts) of consecutive documents, about chunk_chars
    characters each."""
    texts: list[str] = []
    size = first = chunk = 0
    n = 0
    for doc in docs:
        texts.append(doc.text)
        size += len(doc.text)
        n += 1
        if size >= chunk_chars:
            yield chunk, first, texts
            chunk, first, texts, size = chunk + 1, n, [], 0
    if texts:
        yield chunk, first, texts


class _InProcess:
    """The executor interface for workers=0: each chunk packed when its result is asked for."""

    def __init__(self, tokenizer_dir: str, settings: dict[str, Any]):
        _init_worker(tokenizer_dir, settings)

    def submit(self, fn, arg):
        class _Done:
            def result(self_inner):
                return fn(arg)

        return _Done()

    def shutdown(self, cancel_futures: bool = False) -> None:
        pass


# --------------------------------------------------------------------------- preparation


def _request(
    files: list[Path],
    *,
    seq_len: int,
    tokenizer: str | None,
    vocab_size: int | None,
    num_shards: int,
    objective: str,
    truncate_stride: int,
    random_next_prob: float,
    eval_fraction: float,
    seed: int,
    chunk_chars: int,
    lowercase: bool,
    part: list[int],
) -> dict[str, Any]:
    """What a preparation depends on; a rerun with the same request on a complete DIR is a
    no-op, one with another request an error."""
    return {
        "corpus": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files],
        "seq_len": seq_len,
        "tokenizer_sha256": tokenizer_sha256(tokenizer) if tokenizer else None,
        "train_vocab": None if tokenizer else {"vocab_size": vocab_size, "lowercase": lowercase},
        "num_shards": num_shards,
        "objective": objective,
        "truncate_stride": truncate_stride,
        "random_next_prob": random_next_prob,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "chunk_chars": chunk_chars,
        "slice": part,
    }


def _check_args(seq_len, num_shards, truncate_stride, random_next_prob, eval_fraction, workers):
    if seq_len < 8:
        raise PrepareError(f"seq_len must be >= 8, got {seq_len}")
    if seq_len - 3 - (truncate_stride - 1) < 2:
        raise PrepareError(
            f"seq_len={seq_len} leaves no room for two segments with truncate_stride="
            f"{truncate_stride}"
        )
    if seq_len > 2**16 - 1:
        raise PrepareError(f"seq_len must be < 65536, got {seq_len}")
    if num_shards < 1:
        raise PrepareError(f"num_shards must be >= 1, got {num_shards}")
    if truncate_stride < 1 or truncate_stride & (truncate_stride - 1):
        raise PrepareError(f"truncate_stride must be a power of two >= 1, got {truncate_stride}")
    if not 0.0 <= random_next_prob <= 1.0:
        raise PrepareError(f"random_next_prob must be in [0, 1], got {random_next_prob}")
    if not 0.0 <= eval_fraction < 1.0:
        raise PrepareError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    if workers < 0:
        raise PrepareError(f"workers must be >= 0, got {workers}")


def prepare_corpus(
    corpus: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    seq_len: int,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    lowercase: bool = True,
    workers: int = 1,
    num_shards: int = 1,
    objective: str = "electra",
    truncate_stride: int = 1,
    random_next_prob: float = 0.5,
    eval_fraction: float = 0.01,
    seed: int = 0,
    chunk_chars: int = 1 << 20,
    slice_index: int = 0,
    slice_count: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare `corpus` into `output` (see the module docstring) and return the manifest.

    Exactly one of `tokenizer` (a tokenizer directory) and `vocab_size` (train a deterministic
    WordPiece vocabulary of that size on the corpus first, one streaming pass) is given.
    `workers=0` packs in this process. `truncate_stride` is `data.truncation_stride(config)` of
    the model that will train on the data. `slice_index` / `slice_count` prepare only the files
    `files[slice_index::slice_count]` (one slice per machine; `merge_prepared` joins them)."""
    if (tokenizer is None) == (vocab_size is None):
        raise PrepareError("give exactly one of tokenizer (a directory) and vocab_size")
    if objective not in ("electra", "mlm"):
        raise PrepareError(f"objective must be 'electra' or 'mlm', got {objective!r}")
    _check_args(seq_len, num_shards, truncate_stride, random_next_prob, eval_fraction, workers)
    out = Path(output)
    if not 0 <= slice_index < slice_count:
        raise PrepareError(f"slice {slice_index} of {slice_count}: need 0 <= index < count")
    all_files = data_lib.stream_corpus_files(corpus)
    files = all_files[slice_index::slice_count]
    if not files:
        raise PrepareError(
            f"slice {slice_index} of {slice_count} holds no file ({len(all_files)} corpus files)"
        )
    tok_arg = os.fspath(tokenizer) if tokenizer is not None else None
    if tok_arg is not None and not Path(tok_arg).is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tok_arg}")
    request = _request(
        files,
        seq_len=seq_len,
        tokenizer=tok_arg,
        vocab_size=vocab_size,
        num_shards=num_shards,
        objective=objective,
        truncate_stride=truncate_stride,
        random_next_prob=random_next_prob,
        eval_fraction=eval_fraction,
        seed=seed,
        chunk_chars=chunk_chars,
        lowercase=lowercase,
        part=[slice_index, slice_count],
    )
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        saved = manifest.get("request", {})
        diff = [k for k in request if saved.get(k) != request[k]]
        if diff:
            details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {request[k]!r}" for k in diff)
            raise PrepareError(
                f"{out} already holds data prepared with other settings ({details}); choose "
                "another output directory or delete it"
            )
        if progress:
            print(
                f"{out}: already prepared ({manifest['splits']['train']['records']:,} train "
                "examples); nothing to do",
                file=sys.stderr,
            )
        return manifest
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out} exists and is not a prepared data directory (no {MANIFEST})")

    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        if progress:
            print(f"removing {partial} (left by an interrupted preparation)", file=sys.stderr)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    def fill():
        tok_dir = partial / TOKENIZER_DIR
        t_start = time.time()
        from funnel_jax.tokenizer import FunnelTokenizer

        if tok_arg is not None:
            tok = FunnelTokenizer.from_pretrained(tok_arg)
        else:
            docs = (d.text for d in data_lib.iter_documents(files))
            tok = FunnelTokenizer.train(docs, int(vocab_size), lowercase=lowercase)
        tok.save_pretrained(tok_dir)
        vocab_seconds = time.time() - t_start
        special = data_lib.SpecialIds.from_tokenizer(tok)
        dtype = record_dtype(len(tok))

        settings = {
            "seq_len": seq_len,
            "truncate_stride": truncate_stride,
            "random_next_prob": random_next_prob,
            "eval_fraction": eval_fraction,
            "seed": seed,
            "slice_index": slice_index,
        }
        from array_record.python.array_record_module import ArrayRecordWriter

        shard_names = {
            "train": [f"train-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)],
            "eval": ["eval-00000-of-00001.array_record"],
        }
        writers = {
            s: [ArrayRecordWriter(str(partial / n), WRITER_OPTIONS) for n in names]
            for s, names in shard_names.items()
        }
        counts = {s: [[0, 0] for _ in names] for s, names in shard_names.items()}  # records, tokens
        totals = collections.Counter()
        if workers == 0:
            executor = _InProcess(str(tok_dir), settings)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(tok_dir), settings),
            )
        from tqdm import tqdm

        bar = tqdm(
            desc="preparing", unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True
        )
        t_pack = time.time()
        try:
            window: collections.deque = collections.deque()
            max_in_flight = 2 * max(1, workers)

            def drain_one():
                res = window.popleft().result()
                for split in SPLITS:
                    k = res["chunk"] % num_shards if split == "train" else 0
                    for rec in res[split]["records"]:
                        writers[split][k].write(rec)
                    counts[split][k][0] += len(res[split]["records"])
                    counts[split][k][1] += res[split]["tokens"]
                    totals[f"{split}_documents"] += res[split]["documents"]
                totals["documents"] += res["documents"]
                totals["corpus_tokens"] += res["corpus_tokens"]
                totals["cpu_seconds"] += res["cpu_seconds"]  # of packing: tokens/worker-CPU-s
                bar.update(res["corpus_tokens"])

            for task in _chunks(data_lib.iter_documents(files), chunk_chars):
                window.append(executor.submit(_pack_chunk, task))
                if len(window) >= max_in_flight:
                    drain_one()
            while window:
                drain_one()
        finally:
            bar.close()
            executor.shutdown(cancel_futures=True)
            for ws in writers.values():
                for w in ws:
                    w.close()
        pack_seconds = time.time() - t_pack
        if totals["documents"] == 0:
            raise PrepareError("the corpus holds no document")
        splits = {}
        for split, names in shard_names.items():
            shards = [
                {"path": n, "records": c[0], "tokens": c[1]}
                for n, c in zip(names, counts[split], strict=True)
            ]
            splits[split] = {
                "shards": shards,
                "records": sum(s["records"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
                "documents": totals[f"{split}_documents"],
            }
        if splits["train"]["records"] == 0:
            raise PrepareError("the corpus gives no training example (no text after tokenization)")
        manifest = {
            "format": FORMAT,
            "seq_len": seq_len,
            "dtype": dtype,
            "splits": splits,
            "documents": totals["documents"],
            "corpus_tokens": totals["corpus_tokens"],
            "tokenizer": {
                "path": TOKENIZER_DIR,
                "sha256": tokenizer_sha256(tok_dir),
                "vocab_size": len(tok),
                "pad_id": special.pad,
                "trained": tok_arg is None,
            },
            "packing": {
                "layout": "<cls> A <sep> B <sep>; token types 2, 0, 1; pads type 0",
                "record": "[len(A), random_next, <cls>, A, <sep>, B, <sep>] as dtype",
                "objective": objective,
                "truncate_stride": truncate_stride,
                "random_next_prob": random_next_prob,
                "eval_fraction": eval_fraction,
                "seed": seed,
                "chunk_chars": chunk_chars,
                "slice": [slice_index, slice_count],
            },
            "request": request,
        }
        _write_json(partial / MANIFEST, manifest)
        return manifest, splits, totals, pack_seconds, vocab_seconds

    try:
        manifest, splits, totals, pack_seconds, vocab_seconds = fill()
    except Exception:  # bad input or a failed worker: leave no partial directory behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():  # an empty directory
        out.rmdir()
    os.replace(partial, out)
    if progress:
        rate = totals["corpus_tokens"] / max(pack_seconds, 1e-9)
        cpu_rate = totals["corpus_tokens"] / max(totals["cpu_seconds"], 1e-9)
        print(
            f"{out}: {splits['train']['records']:,} train / {splits['eval']['records']:,} eval "
            f"examples of {seq_len} tokens from {totals['documents']:,} documents, "
            f"{totals['corpus_tokens']:,} tokens in {pack_seconds:.1f} s ({rate:,.0f} tokens/s"
            f", {workers} worker(s); {cpu_rate:,.0f} tokens per CPU-second of packing); "
            f"vocabulary {vocab_seconds:.1f} s",
            file=sys.stderr,
        )
    return manifest


def merge_prepared(parts: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict:
    """One manifest over several prepared directories (e.g. one per machine, each of a slice of
    the input files, all with the same tokenizer and settings): `output/manifest.json` lists the
    parts' shards by relative path and `output/tokenizer` is a copy of theirs. The parts stay
    where they are (the merged directory refers to them)."""
    if not parts:
        raise PrepareError("no prepared directory to merge")
    out = Path(output)
    if out.exists():
        raise PrepareError(f"{out} exists; merge into a new directory")
    manifests = [read_manifest(p) for p in parts]
    first = manifests[0]
    for p, m in zip(parts, manifests, strict=True):
        for key in ("seq_len", "dtype"):
            if m[key] != first[key]:
                raise PrepareError(
                    f"{p}: {key} {m[key]!r} differs from {parts[0]}'s {first[key]!r}"
                )
        if m["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise PrepareError(f"{p}: another tokenizer than {parts[0]}'s (SHA-256 differs)")
        for key in ("truncate_stride", "random_next_prob", "objective"):
            if m["packing"][key] != first["packing"][key]:
                raise PrepareError(
                    f"{p}: packing.{key} {m['packing'][key]!r} differs from {parts[0]}'s "
                    f"{first['packing'][key]!r}"
                )
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    shutil.copytree(Path(parts[0]) / first["tokenizer"]["path"], partial / TOKENIZER_DIR)
    splits = {}
    for split in SPLITS:
        shards = []
        for p, m in zip(parts, manifests, strict=True):
            rel = os.path.relpath(Path(p).resolve(), out.parent.resolve())
            for s in m["splits"][split]["shards"]:
                shards.append({**s, "path": os.path.join("..", rel, s["path"])})
        splits[split] = {
            "shards": shards,
            "records": sum(s["records"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(m["splits"][split]["documents"] for m in manifests),
        }
    manifest = {
        **{k: first[k] for k in ("format", "seq_len", "dtype", "packing")},
        "splits": splits,
        "documents": sum(m["documents"] for m in manifests),
        "corpus_tokens": sum(m["corpus_tokens"] for m in manifests),
        "tokenizer": {**first["tokenizer"], "path": TOKENIZER_DIR},
        "merged_from": [str(Path(p).resolve()) for p in parts],
    }
    _write_json(partial / MANIFEST, manifest)
    os.replace(partial, out)
    return manifest
