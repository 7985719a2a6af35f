"""Compile the forward and the pretraining train step for a GPU or TPU target on this machine.

    # GPU (venv with jax[cuda13]; see README "Compiling for GPU and TPU without one")
    JAX_PLATFORMS=cpu python -m experiments.aot_compile --target h200 --config large \
        --seq-len 512 --batch-size 16 --dtype bfloat16
    # TPU slice (venv with jax[tpu])
    JAX_PLATFORMS=cpu python -m experiments.aot_compile --target tpu:v5p:4x4x4 --mesh fsdp=4 ...
    # the host's own devices (main venv; what CI tests)
    python -m experiments.aot_compile --target cpu --config configs/models/small.json ...

Prints, per program (the forward with --forward, and the train step), the lowering and compile
seconds, kernels (fusions, cuBLAS / cuDNN calls, Triton GEMMs), collectives by kind and bytes,
memory per device (arguments, temporaries, peak) and the model FLOPs. Nothing runs and nothing
is allocated on the target; autotuning is skipped, so GPU compile times are a lower bound.
`--json FILE` writes the numbers, `--hlo-dir DIR` the compiled HLO text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

GIB = 1024**3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", default="cpu", help="cpu | h200 | h100[:1x1xN] | tpu:v5p:4x4x4")
    p.add_argument("--target-config", default=None, help="a GpuTargetConfig .txtpb file")
    p.add_argument("--mesh", default=None, help="data=..,fsdp=..,tensor=.. (default: data=-1)")
    p.add_argument("--config", default="large", help="configs/models/<name>.json or a path")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--remat-policy", default=None, help="override the config's remat_policy")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="model config overrides, e.g. attention_type=factorized")  # fmt: skip
    p.add_argument("--step", default="electra", choices=["electra", "public"],
                   help="electra: the project's pretraining step; public: FunnelForPreTraining "
                   "loss via labels= with optax.adamw (a user's own step)")  # fmt: skip
    p.add_argument("--pretrain-preset", default="large", help="configs/pretrain/ preset (electra)")
    p.add_argument("--forward", action="store_true", help="also compile the forward")
    p.add_argument("--no-train-step", action="store_true", help="compile the forward only")
    p.add_argument("--xla-option", nargs="*", default=[], metavar="NAME=VALUE",
                   help="compiler options, e.g. xla_gpu_enable_triton_gemm=false")  # fmt: skip
    p.add_argument(
        "--settings",
        default="none",
        choices=["none", "fast-compile", "compile-check"],
        help="fast-compile: funnel_jax.runtime.accelerator_settings of the target (what the "
        "training commands apply); compile-check: those plus XLA's lowest optimization level, "
        "to check that a configuration compiles and fits (not the program training runs)",
    )
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    p.add_argument("--hlo-dir", default=None, help="write each compiled program's HLO text here")
    return p.parse_args(argv)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_model_config(name: str, overrides: list[str], remat_policy: str | None):
    from funnel_jax import FunnelConfig

    path = Path(name)
    if not path.is_file():
        path = Path(__file__).resolve().parent.parent / "configs" / "models" / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"--config {name!r}: no such file or configs/models preset ({path})")
    config = FunnelConfig.from_json_file(path)
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set: expected FIELD=VALUE, got {item!r}")
        v = _value(value)
        changes[key] = tuple(v) if isinstance(v, list) else v
    if remat_policy:
        changes["remat_policy"] = remat_policy
    return config.replace(**changes) if changes else config


def optimization_level() -> str:
    """jax_optimization_level ('O0'..'O3'), 'default' when unset (the compiler's own)."""
    import jax

    level = str(jax.config.jax_optimization_level)
    return "default" if level == "UNKNOWN" else level


def format_report(r: dict) -> str:
    h, m = r["hlo"], r["memory"]
    lines = [
        f"[{r['program']}] lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s wall "
        f"(CPU time {r['lower_cpu_s']:.1f} s + {r['compile_cpu_s']:.1f} s, all threads)",
        f"  kernels {h['kernels']} (fusions {h['fusions']}, cuBLAS {h['cublas_gemms']}, "
        f"cuDNN {h['cudnn_calls']}, Triton GEMMs {h['triton_gemms']}), while loops "
        f"{h['while_loops']}, instructions {h['instructions']}",
        f"  fusion kinds {h['fusion_kinds']}",
    ]
    if h["custom_calls"]:
        lines.append(f"  custom calls {h['custom_calls']}")
    coll = ", ".join(
        f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in h["collectives"].items()
    )
    lines.append(f"  collectives: {coll or 'none'}")
    if m:
        lines.append(
            f"  memory per device: arguments {m['arguments'] / GIB:.2f} GiB, outputs "
            f"{m['outputs'] / GIB:.2f} GiB (aliased {m['aliased'] / GIB:.2f}), temporaries "
            f"{m['temporaries'] / GIB:.2f} GiB, peak {m['peak'] / GIB:.2f} GiB"
        )
    if h.get("estimated_cycles"):
        unknown = h.get("loops_without_trip_count", 0)
        lines.append(
            f"  TPU cost model: {h['estimated_cycles'] / 1e6:,.1f} M cycles per step per chip "
            "(the compiler's static estimate of the compute, loop bodies times their trip "
            "counts" + (f"; {unknown} loops without a trip count counted once" if unknown else "")
            + ")"
        )  # fmt: skip
    lines.append(f"  model FLOPs {r['model_flops'] / 1e12:.3f} TFLOP (analytic, global batch)")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from funnel_jax import aot

    target = aot.parse_target(args.target, args.target_config)
    if target.kind != "cpu" and os.environ.get("JAX_PLATFORMS", "") != "cpu":
        print("note: set JAX_PLATFORMS=cpu for deviceless compiles", file=sys.stderr)
    options = dict(aot.parse_compiler_options(args.xla_option))
    if args.settings in ("fast-compile", "compile-check"):
        from funnel_jax.runtime import COMPILE_CHECK_JAX_SETTINGS, accelerator_settings

        settings = accelerator_settings(target.platform)
        if args.settings == "compile-check":
            settings["jax"].update(COMPILE_CHECK_JAX_SETTINGS)
        aot.apply_jax_settings(settings["jax"])
        options = {**settings["compiler_options"], **options}
    import jax

    from funnel_jax import sharding
    from funnel_jax.dropout import resolve_dropout_rng

    config = load_model_config(args.config, args.set, args.remat_policy)
    # "auto" would read this process's backend (cpu): resolve it for the target instead.
    config = config.replace(dropout_rng=resolve_dropout_rng(config.dropout_rng, target.platform))
    devices = aot.target_devices(target)
    mesh = sharding.make_mesh(args.mesh, devices=devices)
    sharding.check_divisible(args.batch_size, mesh)
    print(
        f"target {target.name} ({target.kind}, {len(devices)} devices: {devices[0].device_kind}), "
        f"mesh {dict(mesh.shape)}, config {args.config} (remat {config.remat_policy}, scan_layers "
        f"{getattr(config, 'scan_layers', None)}, dropout_rng {config.dropout_rng}), batch "
        f"{args.batch_size}, length {args.seq_len}, {args.dtype}, step {args.step}, jax "
        f"{jax.__version__}, compiler options {options or '{}'}, prng "
        f"{jax.config.jax_default_prng_impl}, settings {args.settings} (optimization level "
        f"{optimization_level()})",
        flush=True,
    )
    kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype)
    programs = []
    if args.forward or args.no_train_step:
        programs.append(lambda: aot.build_forward(config, mesh, **kw))
    if not args.no_train_step:
        programs.append(
            lambda: aot.build_train_step(
                config,
                mesh,
                step=args.step,
                pretrain_preset=args.pretrain_preset,
                **kw,
            )
        )
    reports = []
    for build in programs:
        report = aot.compile_program(build(), mesh, options)
        text = report.pop("hlo_text")
        if args.hlo_dir:
            os.makedirs(args.hlo_dir, exist_ok=True)
            Path(args.hlo_dir, f"{report['program']}.hlo.txt").write_text(text)
        print(format_report(report), flush=True)
        reports.append(report)
    if args.json:
        meta = {
            "target": args.target,
            "mesh": dict(mesh.shape),
            "config": args.config,
            "remat_policy": config.remat_policy,
            "dropout_rng": config.dropout_rng,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "dtype": args.dtype,
            "step": args.step,
            "compiler_options": options,
            "prng": jax.config.jax_default_prng_impl,
            "settings": args.settings,
            "optimization_level": optimization_level(),
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "programs": reports}, indent=1))
    return reports


if __name__ == "__main__":
    main()
