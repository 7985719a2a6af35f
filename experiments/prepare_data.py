"""Prepare a pretraining corpus into ArrayRecord shards (funnel_jax/prepare.py).

    python -m experiments.prepare_data --corpus wiki/ books.jsonl.zst --output data/wiki-128 \
        --seq-len 128 --tokenizer tok/ --workers 8 --num-shards 64 --truncate-stride 4
    python -m experiments.prepare_data --corpus wiki/ --output data/wiki-128 --seq-len 128 \
        --vocab-size 30000                     # trains a deterministic WordPiece vocabulary first
    # many machines: machine i of T prepares a slice of the input files, then one merge
    python -m experiments.prepare_data --corpus wiki/ --output parts/$i --slice $i/$T ...
    python -m experiments.prepare_data --merge parts/0 parts/1 ... --output data/wiki-128

The training command reads the result with funnel_jax.loader.PreparedBatches. A rerun on a
complete output directory does nothing; an interrupted one leaves only `.NAME.partial` behind,
which the next run removes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m experiments.prepare_data",
        description="Tokenize and pack a corpus into ArrayRecord shards for pretraining.",
    )
    p.add_argument(
        "--corpus",
        nargs="+",
        help="text files, JSON Lines files (a 'text' field a line), their .gz/.zst, directories",
    )
    p.add_argument("--output", required=True, help="the prepared directory to write")
    p.add_argument("--seq-len", type=int, help="tokens per example")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", help="a tokenizer directory (FunnelTokenizer.from_pretrained)")
    tok.add_argument("--vocab-size", type=int, help="train a WordPiece vocabulary of this size")
    p.add_argument("--cased", action="store_true", help="with --vocab-size: keep the case")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="packing processes (0: this one)"
    )
    p.add_argument("--num-shards", type=int, default=1, help="train shards (chunk k -> k %% K)")
    p.add_argument("--objective", choices=["electra", "mlm"], default="electra")
    p.add_argument(
        "--truncate-stride",
        type=int,
        default=1,
        help="2**(num_blocks-1) for a model with separate_cls and truncate_seq "
        "(funnel_jax.data.truncation_stride), else 1",
    )
    p.add_argument("--random-next-prob", type=float, default=0.5)
    p.add_argument("--eval-fraction", type=float, default=0.01, help="share of held-out documents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-chars", type=int, default=1 << 20, help="characters per packing task")
    p.add_argument("--slice", default="0/1", help="I/T: prepare only files[I::T]")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="merge prepared directories")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from funnel_jax import prepare
    from funnel_jax.data import CorpusError

    try:
        if args.merge:
            manifest = prepare.merge_prepared(args.merge, args.output)
        else:
            if not args.corpus or args.seq_len is None:
                raise prepare.PrepareError("--corpus and --seq-len are required")
            if args.tokenizer is None and args.vocab_size is None:
                raise prepare.PrepareError("give --tokenizer DIR or --vocab-size N")
            try:
                index, count = (int(x) for x in args.slice.split("/"))
            except ValueError:
                raise prepare.PrepareError(f"--slice must be I/T, got {args.slice!r}") from None
            manifest = prepare.prepare_corpus(
                args.corpus,
                args.output,
                seq_len=args.seq_len,
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                lowercase=not args.cased,
                workers=args.workers,
                num_shards=args.num_shards,
                objective=args.objective,
                truncate_stride=args.truncate_stride,
                random_next_prob=args.random_next_prob,
                eval_fraction=args.eval_fraction,
                seed=args.seed,
                chunk_chars=args.chunk_chars,
                slice_index=index,
                slice_count=count,
                progress=not args.no_progress,
            )
    except (CorpusError, prepare.PrepareError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    summary = {
        s: {k: manifest["splits"][s][k] for k in ("records", "tokens", "documents")}
        for s in manifest["splits"]
    }
    print(json.dumps({"output": args.output, "seq_len": manifest["seq_len"], **summary}))
    return manifest


if __name__ == "__main__":
    main()
