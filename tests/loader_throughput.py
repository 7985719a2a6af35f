"""Loader throughput alone (no model): python tests/loader_throughput.py DATA_DIR [--batch 256]
[--batches 300] [--threads 2]. Prints token positions/s and non-padding tokens/s, median of
3 rounds, in one process."""

from __future__ import annotations

import argparse
import statistics
import time

from funnel_jax.loader import PreparedBatches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    it = PreparedBatches(args.data_dir, global_batch=args.batch, seed=0, num_threads=args.threads)
    it.take(10)  # start the prefetch
    rates, real = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        n_real = 0
        for _ in range(args.batches):
            n_real += int(next(it)["attention_mask"].sum())
        dt = time.perf_counter() - t
        rates.append(args.batches * args.batch * it.seq_len / dt)
        real.append(n_real / dt)
    it.close()
    print(
        f"batch {args.batch} x {it.seq_len}, {args.threads} threads: "
        f"{statistics.median(rates) / 1e6:.2f} M token positions/s, "
        f"{statistics.median(real) / 1e6:.2f} M non-padding tokens/s "
        f"(median of {args.rounds} rounds of {args.batches} batches; all: "
        + ", ".join(f"{r / 1e6:.2f}" for r in rates)
        + ")"
    )


if __name__ == "__main__":
    main()
