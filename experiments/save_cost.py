"""Step-time cost of a training checkpoint, synchronous vs async (Orbax), on one device.

    python -m experiments.save_cost --preset small --rounds 5 --interval 4

Times rounds of `--interval` ELECTRA pretraining steps (configs/models/PRESET, synthetic
batches), three kinds of round interleaved in one process (none, sync, async, none, ...) so
that a change of load on the host hits all three alike:
  none:  `interval` steps, no save;
  sync:  a save after the first step that returns once written, then the other steps;
  async: a save after the first step that returns once the arrays are off the device and is
         written in the background while the other steps run; the round ends when the write
         has finished (so a write longer than the steps shows as cost).
The cost of one save is the median round time minus the median no-save round time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

MODES = ("none", "sync", "async")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--rounds", type=int, default=5, help="rounds of each kind")
    p.add_argument("--interval", type=int, default=4, help="steps per round (one save)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.interval < 2 or args.rounds < 1:
        p.error("--interval must be >= 2 and --rounds >= 1")

    from dataclasses import fields

    import jax
    import numpy as np

    from funnel_jax.checkpoint import TrainCheckpointer
    from funnel_jax.config import FunnelConfig
    from funnel_jax.tokenizer import FunnelTokenizer
    from funnel_jax.training import load_pretrain_config
    from funnel_jax.training.files import load_json_object
    from funnel_jax.training.loop import compile_step
    from funnel_jax.training.presets import preset_path
    from funnel_jax.training.pretraining import build_program

    cfg = load_pretrain_config(
        "tiny",
        [f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}",
         "optimizer.warmup_steps=1"],
    )  # fmt: skip
    # The model of configs/models/PRESET alone (not merged with tiny's fields).
    model = load_json_object(preset_path("models", args.preset))
    model = {k: v for k, v in model.items() if k in {f.name for f in fields(FunnelConfig)}}
    cfg = cfg.replace(model={**model, "architectures": None})
    tok = FunnelTokenizer.train(iter(["a b c d e f g h"] * 10), vocab_size=200)
    program = build_program(cfg, tok)
    state = jax.device_put(program.init_state(jax.random.PRNGKey(0)), jax.devices()[0])
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    vocab = int(model.get("vocab_size", 30522))
    batch = {
        "input_ids": rng.integers(5, min(vocab, 30000), shape, dtype=np.int32),
        "token_type_ids": np.zeros(shape, np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "random_next": np.zeros(args.batch_size, np.int32),
    }
    batch = jax.device_put(batch, jax.devices()[0])
    step, compile_s = compile_step(program.train_step, state, batch)
    n = sum(x.size for x in jax.tree.leaves(state))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(
        f"{args.preset}: {n:,} state values ({nbytes / 2**20:.0f} MiB), step compiled in "
        f"{compile_s:.1f} s; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    state, _ = step(state, batch)  # warm-up
    jax.block_until_ready(state)

    rounds: dict[str, list[float]] = {m: [] for m in MODES}
    steps: list[float] = []  # single steps of the no-save rounds
    saves = {"sync": [], "async": []}  # time of the save call itself
    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {
            m: TrainCheckpointer(Path(tmp) / m, keep=1, async_save=m == "async")
            for m in ("sync", "async")
        }
        for r in range(args.rounds):
            for mode in MODES:
                t0 = time.perf_counter()
                for i in range(args.interval):
                    ts = time.perf_counter()
                    state, metrics = step(state, batch)
                    jax.block_until_ready(metrics)
                    if mode == "none":
                        steps.append(time.perf_counter() - ts)
                    if i == 0 and mode != "none":
                        ckpt = ckpts[mode]
                        tc = time.perf_counter()
                        ckpt.save(int(state.step), state, extra={"step": int(state.step)})
                        if mode == "sync":
                            ckpt.wait()
                        saves[mode].append(time.perf_counter() - tc)
                if mode == "async":
                    ckpts[mode].wait()  # the write belongs to this round
                rounds[mode].append(time.perf_counter() - t0)
            shown = ", ".join(f"{m} {rounds[m][-1]:.2f} s" for m in MODES)
            print(f"round {r + 1}/{args.rounds}: {shown}", flush=True)
        for c in ckpts.values():
            c.close()
    med = {m: statistics.median(v) for m, v in rounds.items()}
    step_s = statistics.median(steps)
    print(
        f"median step without a save {step_s * 1000:.0f} ms; median round of {args.interval} "
        f"steps: " + ", ".join(f"{m} {med[m]:.3f} s" for m in MODES)
    )
    for mode in ("sync", "async"):
        cost = med[mode] - med["none"]
        call = statistics.median(saves[mode])
        print(
            f"save cost ({mode}): {cost * 1000:+.0f} ms per save ({cost / step_s:+.2f} steps; "
            f"the save call itself {call * 1000:.0f} ms)"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
