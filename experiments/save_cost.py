"""Step-time cost of a training checkpoint, synchronous vs async (Orbax), on one device.

    python -m experiments.save_cost --preset small --steps 6

Times `--steps` train steps of the ELECTRA pretraining step (configs/models/PRESET, synthetic
batches) three ways, each step followed by: nothing; a synchronous save (returns when written);
an async save (returns once the arrays are off the device; written in the background, waited
for before the next save). Prints the median step time of each and the cost of a save.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

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
    # The model of configs/models/PRESET alone (not merged with tiny's fields), dropout off.
    model = load_json_object(preset_path("models", args.preset))
    model = {k: v for k, v in model.items() if k in {f.name for f in fields(FunnelConfig)}}
    cfg = cfg.replace(model={**model, "architectures": None})
    tok = FunnelTokenizer.train(iter(["a b c d e f g h"] * 10), vocab_size=200)
    program = build_program(cfg, tok)
    state = jax.device_put(program.init_state(jax.random.PRNGKey(0)), jax.devices()[0])
    rng = np.random.default_rng(0)
    shape = (args.batch_size, args.seq_len)
    batch = {
        "input_ids": rng.integers(5, 30000, shape, dtype=np.int32),
        "token_type_ids": np.zeros(shape, np.int32),
        "attention_mask": np.ones(shape, np.int32),
        "random_next": np.zeros(args.batch_size, np.int32),
    }
    batch = jax.device_put(batch, jax.devices()[0])
    step, compile_s = compile_step(program.train_step, state, batch)
    n = sum(x.size for x in jax.tree.leaves(state))
    print(f"{args.preset}: {n:,} state values, step compiled in {compile_s:.1f} s")
    state, _ = step(state, batch)  # warm-up

    results = {}
    for mode in ("none", "sync", "async"):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = TrainCheckpointer(Path(tmp) / "c", keep=2, async_save=mode == "async")
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, metrics = step(state, batch)
                jax.block_until_ready(metrics)
                if mode != "none":
                    ckpt.wait()  # the previous async save (its time counts for this step)
                    ckpt.save(int(state.step), state, extra={"step": int(state.step)})
                    if mode == "sync":
                        ckpt.wait()
                times.append(time.perf_counter() - t0)
            ckpt.wait()
            ckpt.close()
        results[mode] = statistics.median(times)
        print(f"{mode:>5}: median step {results[mode] * 1000:.0f} ms over {args.steps} steps")
    for mode in ("sync", "async"):
        cost = results[mode] - results["none"]
        print(f"save cost ({mode}): {cost * 1000:+.0f} ms per step "
              f"({cost / results['none'] * 100:+.0f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
