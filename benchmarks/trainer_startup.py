"""The training process's peak memory and its time from start to the first step, per prepared
data directory (issue 16): `python -m experiments.pretrain --data DIR` is launched, its resident
memory (the process and its children) sampled every 50 ms, and the time from the launch to the
first logged train step read from metrics.jsonl. The directories are run in turn, `--rounds`
times (alternating, so that a change of the machine's load hits both), and medians printed.

    python benchmarks/trainer_startup.py /data/p20 /data/p400 --rounds 3 [-- --set ...]

Arguments after `--` go to experiments.pretrain. A persistent compilation cache (one per
invocation) is warmed by a first, untimed run, so the timed runs measure what a restart after
a preemption costs: start-up, data, the cached compile, one step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_once(data_dir: str, workdir: Path, cache: Path, extra: list[str]) -> dict:
    out = workdir / f"run-{time.time_ns()}"
    cmd = [
        sys.executable, "-m", "experiments.pretrain", "--data", data_dir, "--output-dir",
        str(out), "--steps", "2", "--no-progress", "--compile-cache", str(cache),
        "--set", "train.log_every=1", "optimizer.warmup_steps=1", "data.eval_batches=1", *extra,
    ]  # fmt: skip
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    main = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(q.memory_info().rss for q in [main, *main.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    log = proc.stdout.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{log}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = min(r["time"] for r in rows if r["split"] == "train")
    return {"first_step_s": first - t0, "peak_rss_mib": peak / 2**20}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dirs", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trainer_startup_") as tmp:
        work, cache = Path(tmp), Path(tmp) / "xla"
        run_once(args.data_dirs[0], work, cache, extra)  # warms the compilation cache
        results: dict[str, list[dict]] = {d: [] for d in args.data_dirs}
        for r in range(args.rounds):
            for d in args.data_dirs:
                res = run_once(d, work, cache, extra)
                results[d].append(res)
                print(f"round {r + 1} {d}: {res['first_step_s']:.2f} s to the first step, "
                      f"peak {res['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip
    print("\n| data | train examples | time to first step (median) | peak RSS (median) | rounds |")
    print("|---|---|---|---|---|")
    for d, rs in results.items():
        manifest = json.loads((Path(d) / "manifest.json").read_text())
        n = manifest["splits"]["train"]["records"]
        t = statistics.median(x["first_step_s"] for x in rs)
        m = statistics.median(x["peak_rss_mib"] for x in rs)
        each = ", ".join(f"{x['first_step_s']:.2f} s / {x['peak_rss_mib']:.0f} MiB" for x in rs)
        print(f"| {d} | {n:,} | {t:.2f} s | {m:.0f} MiB | {each} |")


if __name__ == "__main__":
    main()
