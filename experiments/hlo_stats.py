"""Size of the compiled forward and train step: fusions, instructions, compile seconds.

    python -m experiments.hlo_stats --config large --seq-len 512 [--dtype bfloat16]

Compiles (nothing runs, nothing is allocated) the FunnelForPreTraining forward and the
benchmark's train step (experiments/benchmark.py) with `scan_layers` off and on, and counts the
fusions and instructions of XLA's optimised HLO. On an accelerator every fusion is a kernel that
the compiler emits and assembles, so the count is a lead on compile time there.
"""

from __future__ import annotations

import argparse
import re
import time


def hlo_stats(config, batch: int, seq_len: int, dtype_name: str) -> list[dict]:
    import jax
    import jax.numpy as jnp

    import funnel_jax as fj
    from experiments import benchmark as bm

    dt = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    inputs, labels = bm.jax_batch(config, batch, seq_len)
    rows = []
    for scan in (False, True):
        cfg = config.replace(scan_layers=scan)
        module = fj.FunnelForPreTraining(config=cfg, dtype=dt)
        tx = bm.torch_adamw_defaults()

        def make_state(module=module, tx=tx):
            params = fj.init_params(module, jax.random.PRNGKey(0))
            return params, tx.init(params), jax.random.PRNGKey(1)

        state = jax.eval_shape(make_state)

        def forward(p, x, module=module):
            return module.apply({"params": p}, **x).logits

        programs = (
            ("forward", jax.jit(forward), (state[0], inputs)),
            ("train step", jax.jit(bm.make_train_step(module, tx)), (state, inputs, labels)),
        )
        for what, fn, args in programs:
            t0 = time.perf_counter()
            hlo = fn.lower(*args).compile().as_text()
            rows.append(
                {
                    "program": what,
                    "scan_layers": scan,
                    "fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", hlo, re.M)),
                    "instructions": len(re.findall(r"^\s+\S+ = ", hlo, re.M)),
                    "compile_s": time.perf_counter() - t0,
                }
            )
            r = rows[-1]
            print(
                f"{what:10s} scan_layers={str(scan):5s}  fusions {r['fusions']:6d}  "
                f"instructions {r['instructions']:7d}  lower+compile {r['compile_s']:.1f} s",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    from experiments.benchmark import device_name, load_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="large")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    config, name = load_config(args.config)
    print(f"{name}, batch {args.batch_size}, length {args.seq_len}, {args.dtype}, {device_name()}")
    hlo_stats(config, args.batch_size, args.seq_len, args.dtype)


if __name__ == "__main__":
    main()
