"""Where the time goes: a per-op breakdown of a JAX profiler trace.

    python -m experiments.profile_summary TRACE_DIR [--module jit_train_step] [--top 15]

Reads the `*.trace.json.gz` that `jax.profiler.trace(TRACE_DIR)` writes (what
`python -m experiments.benchmark --profile TRACE_DIR` makes), keeps the events XLA tags with
an `hlo_op` (device streams on GPU/TPU, the XLA thread pool on CPU), and sums their durations by
op kind (the HLO name without its `.N` suffix) and by single op. Times are summed over every
step in the trace and over threads, so on CPU they add up to more than wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
from pathlib import Path


def _trace_file(trace_dir: str | Path) -> Path:
    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}")
    return files[-1]


def op_times(trace_dir: str | Path, module: str | None = None) -> dict[str, float]:
    """{hlo_op: total microseconds} of the ops in the newest trace under trace_dir."""
    with gzip.open(_trace_file(trace_dir), "rt") as f:
        events = json.load(f)["traceEvents"]
    procs = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    if module:
        ops = [e for e in ops if module in e["args"].get("hlo_module", "")]
    on_device = [e for e in ops if procs.get(e["pid"], "").startswith("/device:")]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in on_device or ops:
        totals[e["args"]["hlo_op"]] += float(e.get("dur", 0.0))
    return dict(totals)


def op_kind(name: str) -> str:
    return re.sub(r"\.\d+$", "", name)


def summarize(trace_dir: str | Path, module: str | None = None, top: int = 15) -> str:
    """A markdown table: time by op kind, then the `top` single ops, with shares of the total."""
    times = op_times(trace_dir, module)
    if not times:
        return f"no XLA op events in the trace under {trace_dir}"
    total = sum(times.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for name, us in times.items():
        kinds[op_kind(name)] += us
        counts[op_kind(name)] += 1
    lines = [
        f"op time in the trace: {total / 1e3:.1f} ms summed over ops"
        + (f" of {module}" if module else ""),
        "",
        "| op kind | ops | ms | share |",
        "|---|---|---|---|",
    ]
    for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {kind} | {counts[kind]} | {us / 1e3:.1f} | {100 * us / total:.1f}% |")
    lines += ["", "| single op | ms | share |", "|---|---|---|"]
    for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {name} | {us / 1e3:.1f} | {100 * us / total:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--module", default="jit_train_step", help="'' for every compiled module")
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args(argv)
    print(summarize(args.trace_dir, args.module or None, args.top))


if __name__ == "__main__":
    main()
