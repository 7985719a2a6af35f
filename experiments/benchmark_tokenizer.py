"""Batch-encoding throughput: funnel_jax.FunnelTokenizer against transformers' FunnelTokenizerFast.

Both tokenizers are built from the same ~30k WordPiece vocab.txt (trained here, offline, on the
docstrings and comments of the Python standard library) and encode the same texts in the same
run. Each repetition times one pass over all texts with each tokenizer, alternating which goes
first; the table gives the median over repetitions and the ratio.

    python -m experiments.benchmark_tokenizer            # full run
    python -m experiments.benchmark_tokenizer --quick    # a smaller, faster run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sysconfig
import tempfile
import time
import warnings

import numpy as np

from funnel_jax.tokenizer import FunnelTokenizer

_DOC_RE = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'|^[ \t]*#+ ?([^\n]+)', re.S | re.M)


def stdlib_corpus() -> list[str]:
    """pydoc's topic help plus the stdlib's docstrings and comments (about 6.5 MB of English)."""
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


def _batches(seq, size):
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _equal(ours_out, ref_out) -> bool:
    for key in ref_out:
        if key not in ours_out:
            return False
        a = np.asarray(ours_out[key])
        b = np.asarray(ref_out[key])
        if a.shape != b.shape or not np.array_equal(a, b):
            return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer texts and repetitions")
    parser.add_argument("--texts", type=int, default=None, help="texts per pass")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    n_texts = args.texts or (2000 if args.quick else 8000)
    reps = args.reps or (3 if args.quick else 7)

    import tokenizers
    import transformers

    corpus = stdlib_corpus()
    t0 = time.perf_counter()
    trained = FunnelTokenizer.train(corpus, vocab_size=30000, min_frequency=1)
    train_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        trained.save_pretrained(tmp)
        vocab_dir = os.path.join(tmp, "vocab_only")
        os.makedirs(vocab_dir)
        os.replace(os.path.join(tmp, "vocab.txt"), os.path.join(vocab_dir, "vocab.txt"))
        ours = FunnelTokenizer.from_vocab(os.path.join(vocab_dir, "vocab.txt"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = transformers.FunnelTokenizerFast.from_pretrained(vocab_dir, model_max_length=512)

    rng = np.random.default_rng(0)
    pool = [t for t in corpus if len(t) >= 30]
    texts = [pool[i] for i in rng.choice(len(pool), size=min(n_texts, len(pool)), replace=False)]
    contexts = [t for t in pool if len(t) >= 600]
    contexts = [contexts[i] for i in rng.choice(len(contexts), size=n_texts // 4, replace=True)]
    questions = [t[:80] for t in texts[: len(contexts)]]
    n_tokens = sum(len(e) for e in ours.backend_tokenizer.encode_batch_fast(texts))

    bs = args.batch_size
    text_batches = _batches(texts, bs)
    qa_batches = list(zip(_batches(questions, bs), _batches(contexts, bs), strict=True))
    singles = texts[: min(500, len(texts))]
    ref_kw = {"return_tensors": "np", "return_token_type_ids": True}

    # name, number of texts per pass, fn(tokenizer, extra kwargs) -> list of outputs
    scenarios = [
        (
            "pad longest, truncate 512",
            len(texts),
            lambda tok, kw: [
                tok(b, padding=True, truncation=True, max_length=512, **kw) for b in text_batches
            ],
        ),
        (
            "pad+truncate to 128",
            len(texts),
            lambda tok, kw: [
                tok(b, padding="max_length", truncation=True, max_length=128, **kw)
                for b in text_batches
            ],
        ),
        (
            "pairs, only_second 256, pad 256",
            len(contexts),
            lambda tok, kw: [
                tok(q, c, padding="max_length", truncation="only_second", max_length=256, **kw)
                for q, c in qa_batches
            ],
        ),
        (
            "QA: overflow stride 64 + offsets",
            len(contexts),
            lambda tok, kw: [
                tok(
                    q,
                    c,
                    padding="max_length",
                    truncation="only_second",
                    max_length=256,
                    stride=64,
                    return_overflowing_tokens=True,
                    return_offsets_mapping=True,
                    **kw,
                )
                for q, c in qa_batches
            ],
        ),
        (
            "one string per call",
            len(singles),
            lambda tok, kw: [tok(t, truncation=True, max_length=512, **kw) for t in singles],
        ),
    ]

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, count, fn in scenarios:
            ours_run = lambda fn=fn: fn(ours, {})  # noqa: E731
            ref_run = lambda fn=fn: fn(ref, ref_kw)  # noqa: E731
            same = all(_equal(o, r) for o, r in zip(ours_run(), ref_run(), strict=True))
            t_ours, t_ref = [], []
            for rep in range(reps):
                order = [(ours_run, t_ours), (ref_run, t_ref)]
                if rep % 2:
                    order.reverse()
                for run, times in order:
                    t = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - t)
            mo, mr = statistics.median(t_ours), statistics.median(t_ref)
            rows.append((name, count, count / mo, count / mr, mo / mr, same))

    print(f"date: {datetime.date.today().isoformat()}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"python {platform.python_version()}"
    )
    print(
        f"tokenizers {tokenizers.__version__}, transformers {transformers.__version__}, "
        f"numpy {np.__version__}"
    )
    print(
        f"vocab: {ours.vocab_size} WordPieces trained in {train_s:.1f} s; {len(texts)} texts "
        f"({n_tokens} tokens), {len(contexts)} question/context pairs, batch size {bs}; "
        f"median of {reps} alternating repetitions"
    )
    print()
    header = (
        f"| {'scenario':<34} | {'texts':>5} | {'ours texts/s':>12} | {'ref texts/s':>11} "
        f"| {'time ours/ref':>13} | same output |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, count, ours_tps, ref_tps, ratio, same in rows:
        print(
            f"| {name:<34} | {count:>5} | {ours_tps:>12,.0f} | {ref_tps:>11,.0f} "
            f"| {ratio:>13.2f} | {'yes' if same else 'NO':>11} |"
        )
    if not all(r[-1] for r in rows):
        raise SystemExit("outputs differ from the reference")


if __name__ == "__main__":
    main()
