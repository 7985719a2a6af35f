"""Speed of funnel_jax against the transformers PyTorch reference, side by side in one process.

    python -m experiments.benchmark                      # small config, batch 8, length 128
    python -m experiments.benchmark --config large --dtype bfloat16 --seq-len 512   # GPU
    python -m experiments.benchmark --scaling            # + time vs length plot (128..2048)

Measures forward throughput (FunnelModel, FunnelBaseModel) and one ELECTRA discriminator
train step (FunnelForPreTraining forward, backward, AdamW), alternating JAX and PyTorch so
machine noise hits both, and reports medians, ratios, analytic model FLOPs (funnel_jax/flops.py)
and MFU against a large matmul timed in the same run. Appends a table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="small", help="name in configs/models/ or a config.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=7, help="alternating rounds; medians reported")
    p.add_argument("--iters", type=int, default=3, help="steps timed per round")
    p.add_argument(
        "--settle",
        type=float,
        default=0.5,
        help="seconds of idle before each timing, so no implementation's spinning threads hit "
        "the next one's",
    )
    p.add_argument("--only", default="forward,train", help="comma list: forward,train,memory")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--remat", default="none", help="remat policy for the timed train step")
    p.add_argument(
        "--attention-impl",
        default="einsum",
        help="comma list of einsum,fused_bias: each is timed as its own JAX row, same rounds",
    )
    p.add_argument(
        "--dropout-rng",
        default="threefry",
        help="comma list of threefry,hash (FunnelConfig.dropout_rng): each a JAX row, same rounds",
    )
    p.add_argument(
        "--memory-policies",
        default="full,none",
        help="remat policies whose train-step memory --only memory reports (increasing order)",
    )
    p.add_argument("--memory-batch-size", type=int, default=0, help="default: --batch-size")
    p.add_argument(
        "--scan-layers", action="store_true", help="config.scan_layers: one scan per block"
    )
    p.add_argument("--scaling", action="store_true", help="time vs length, Funnel vs standard")
    p.add_argument("--scaling-lengths", default="128,256,512,1024,2048")
    p.add_argument("--scaling-batch-size", type=int, default=1, help="batch of the --scaling runs")
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"), help="'' to skip writing")
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "scaling.png"))
    p.add_argument("--compile-cache", default="", help="persistent XLA compile cache directory")
    p.add_argument("--profile", default="", help="write a JAX profiler trace of the train step")
    p.add_argument(
        "--gemm-floor",
        action="store_true",
        help="time each matrix product of the JAX forward and train step alone, XLA and torch "
        "(experiments/gemm_floor.py), against the whole programs in the same rounds",
    )
    return p.parse_args(argv)


def load_config(name: str):
    from funnel_jax import FunnelConfig

    path = Path(name)
    if not path.exists():
        path = ROOT / "configs" / "models" / f"{name}.json"
    return FunnelConfig.from_json_file(path), path.stem


def timed(fn, iters: int) -> float:
    """Seconds per call (fn must block until its result is ready)."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def matmul_peak(dtype_name: str, repeats: int = 5) -> dict:
    """FLOP/s of a large square matmul, in JAX and torch; the larger is the device peak."""
    n = matmul_size()
    run, flops = matmul_fn(dtype_name)
    run()
    jax_t = statistics.median(timed(run, 3) for _ in range(repeats))
    out = {"jax": flops / jax_t}
    try:
        import torch

        tdt = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        ta = torch.randn(n, n, dtype=tdt, device=dev)

        def tmm():
            ta @ ta
            if dev == "cuda":
                torch.cuda.synchronize()

        tmm()
        torch_t = statistics.median(timed(tmm, 3) for _ in range(repeats))
        out["torch"] = 2 * n**3 / torch_t
    except ImportError:
        pass
    out["peak"] = max(out.values())
    return out


def matmul_size() -> int:
    """Side of the peak matmul: 2048 fills a CPU; an accelerator needs 8192 to leave launch
    overhead out of the figure."""
    import jax

    return 2048 if jax.devices()[0].platform == "cpu" else 8192


def matmul_fn(dtype_name: str):
    """(callable, flops): one n^3 matmul in JAX, run in the same rounds as the models so that
    MFU compares against the peak reached under the same machine load."""
    import jax
    import jax.numpy as jnp

    n = matmul_size()
    dt = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
    f = jax.jit(lambda x: x @ x)
    return (lambda: f(a).block_until_ready()), 2 * n**3


def discriminator_loss_fn(module, inputs, labels, dropout_rng):
    """params -> the ELECTRA discriminator loss, dropout on."""
    from funnel_jax import losses
    from funnel_jax.dropout import dropout_key

    def loss_fn(p):
        logits = module.apply(
            {"params": p},
            **inputs,
            deterministic=False,
            rngs={"dropout": dropout_key(dropout_rng, module.config.dropout_rng)},
        ).logits
        return losses.discriminator_loss(logits, labels, inputs["attention_mask"])

    return loss_fn


def make_train_step(module, tx):
    """The ELECTRA discriminator step timed here: forward with dropout, backward, AdamW."""
    import jax
    import optax

    def train_step(state, inputs, labels):
        params, opt_state, rng = state
        rng, drop = jax.random.split(rng)
        loss_fn = discriminator_loss_fn(module, inputs, labels, drop)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, rng), loss

    return train_step


def torch_adamw_defaults():
    import optax

    return optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def synthetic_batch(config, batch, seq_len):
    """Numpy (ids, token types, labels): random ids, a [CLS]-type first token, two segments."""
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(5, config.vocab_size, (batch, seq_len)).astype(np.int32)
    tt = np.zeros_like(ids)
    tt[:, 0] = 2
    tt[:, seq_len // 2 :] = 1
    labels = rng.randint(0, 2, (batch, seq_len)).astype(np.int32)
    return ids, tt, labels


def compiled(what: str, jitted, *args):
    """jitted, compiled ahead of time for args; prints how long tracing and compiling took (on
    a GPU, compilation of a large model can take minutes: this line says where the time went)."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    exe = lowered.compile()
    t2 = time.perf_counter()
    print(f"  compiled {what}: trace {t1 - t0:.1f} s, compile {t2 - t1:.1f} s", flush=True)
    return exe


def jax_batch(config, batch, seq_len):
    """(inputs dict, labels) of synthetic_batch as JAX arrays, no padding."""
    import jax.numpy as jnp

    ids, tt, labels = synthetic_batch(config, batch, seq_len)
    inputs = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.ones_like(ids),
        "token_type_ids": jnp.asarray(tt),
    }
    return inputs, jnp.asarray(labels)


class JaxBench:
    def __init__(self, config, batch, seq_len, dtype_name, parts=("forward", "train")):
        import jax
        import jax.numpy as jnp

        import funnel_jax as fj

        self.jax = jax
        dt = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
        self.inputs, self.labels = jax_batch(config, batch, seq_len)
        self.fwd = {}
        if "forward" in parts:
            for name in ("FunnelModel", "FunnelBaseModel"):
                module = fj.MODEL_CLASSES[name](config=config, dtype=dt)
                params = fj.init_params(module, jax.random.PRNGKey(0))

                def forward(p, inputs, module=module):
                    return module.apply({"params": p}, **inputs).last_hidden_state

                fn = compiled(f"forward {name}", jax.jit(forward), params, self.inputs)
                self.fwd[name] = (fn, params)
        if "train" in parts:
            module = fj.FunnelForPreTraining(config=config, dtype=dt)
            params = fj.init_params(module, jax.random.PRNGKey(0))
            tx = torch_adamw_defaults()
            self.state = (params, tx.init(params), jax.random.PRNGKey(1))
            self.jitted_step = jax.jit(make_train_step(module, tx), donate_argnums=0)
            self.step = compiled(
                "train step", self.jitted_step, self.state, self.inputs, self.labels
            )
            self.module = module

    def forward(self, name):
        fn, params = self.fwd[name]
        return lambda: fn(params, self.inputs).block_until_ready()

    def train(self):
        def run():
            self.state, loss = self.step(self.state, self.inputs, self.labels)
            loss.block_until_ready()

        return run

    def compiled_flops(self):
        lowered = self.jitted_step.lower(self.state, self.inputs, self.labels)
        cost = lowered.compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost.get("flops", 0.0)) if cost else 0.0


def residual_bytes(module, params, inputs, labels) -> int:
    """Bytes the backward pass keeps from the forward (the residuals of `jax.vjp` of the loss,
    parameters it needs included), from the traced program alone: what rematerialisation
    reduces, independent of how a backend's buffer assignment schedules it."""
    import math

    import jax

    loss = discriminator_loss_fn(module, inputs, labels, jax.random.PRNGKey(0))
    residuals = jax.eval_shape(lambda p: jax.vjp(loss, p)[1], params)
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def train_memory(config, batch, seq_len, dtype_name, policy, run_steps=2) -> dict:
    """Memory of the train step under a remat policy: XLA's buffer assignment (arguments +
    outputs - donated aliases + temporaries) and, off CPU, the device's peak bytes in use while
    `run_steps` steps run (process-wide high-water mark: call policies in increasing order)."""
    import jax
    import jax.numpy as jnp

    import funnel_jax as fj

    dt = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    config = config.replace(remat_policy=policy)
    module = fj.FunnelForPreTraining(config=config, dtype=dt)
    tx = torch_adamw_defaults()
    step = jax.jit(make_train_step(module, tx), donate_argnums=0)
    inputs, labels = jax_batch(config, batch, seq_len)

    def make_state():
        params = fj.init_params(module, jax.random.PRNGKey(0))
        return (params, tx.init(params), jax.random.PRNGKey(1))

    abstract = jax.eval_shape(make_state)
    out = {"policy": policy, "batch": batch}
    out["residual_bytes"] = residual_bytes(module, abstract[0], inputs, labels)
    t0 = time.perf_counter()
    compiled = step.lower(abstract, inputs, labels).compile()
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_bytes"] = mem.temp_size_in_bytes
        out["xla_total_bytes"] = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )
    device = jax.devices()[0]
    if run_steps and device.platform != "cpu":
        state = make_state()
        for _ in range(run_steps):
            state, loss = compiled(state, inputs, labels)
        loss.block_until_ready()
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_bytes"] = stats["peak_bytes_in_use"]
        out["loss_finite"] = bool(jnp.isfinite(loss))
        del state
    return out


def torch_inference(model, inputs: dict, dev: str, autocast: bool):
    """A callable running `model(**inputs)` under inference mode (bf16 autocast when asked),
    synchronised on CUDA so that timing it measures the work."""
    import contextlib

    import torch

    def run():
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            model(**inputs)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


class TorchBench:
    def __init__(
        self, config, batch, seq_len, dtype_name, compile_=False, fused=False, parts=("train",)
    ):
        import numpy as np
        import torch
        import transformers

        self.torch = torch
        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = dtype_name == "bfloat16"
        tconfig = transformers.FunnelConfig(**config.to_dict())
        ids, tt, labels = synthetic_batch(config, batch, seq_len)
        t = lambda a: torch.as_tensor(a.astype(np.int64)).to(self.dev)  # noqa: E731
        self.inputs = dict(
            input_ids=t(ids), attention_mask=t(np.ones_like(ids)), token_type_ids=t(tt)
        )
        self.labels = t(labels)
        self.fwd = {}
        if "forward" in parts:
            for name in ("FunnelModel", "FunnelBaseModel"):
                m = getattr(transformers, name)(tconfig).to(self.dev).eval()
                self.fwd[name] = torch.compile(m) if compile_ else m
        if "train" in parts:
            model = transformers.FunnelForPreTraining(tconfig).to(self.dev).train()
            self.model = torch.compile(model) if compile_ else model
            kw = {"fused": True} if fused else {}
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **kw)
            self.state_modules = (model, self.opt)

    def _sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def _ctx(self):
        import contextlib

        if self.autocast:
            return self.torch.autocast(self.dev, dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, name):
        return torch_inference(self.fwd[name], self.inputs, self.dev, self.autocast)

    def train(self):
        def run():
            self.opt.zero_grad(set_to_none=True)
            with self._ctx():
                loss = self.model(**self.inputs, labels=self.labels).loss
            loss.backward()
            self.opt.step()
            self._sync()

        return run

    def train_peak_bytes(self) -> int | None:
        """CUDA bytes of one train step of this model: the step's high-water mark above what was
        allocated before it (activations, gradients, workspace), plus the parameters and AdamW
        state the model holds between steps."""
        torch = self.torch
        if self.dev != "cuda":
            return None
        self.train()()  # AdamW state exists from here on
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.train()()
        peak = torch.cuda.max_memory_allocated()
        model, opt = self.state_modules
        held = sum(p.numel() * p.element_size() for p in model.parameters())
        for st in opt.state.values():
            held += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return peak - before + held


def fmt_times(times: dict) -> str:
    return ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items())


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def fmt_memory(row: dict) -> str:
    return (
        f"remat={row['policy']} batch {row['batch']}: kept for the backward "
        f"{gib(row['residual_bytes'])} GiB, XLA {gib(row.get('xla_total_bytes'))} GiB "
        f"(temps {gib(row.get('temp_bytes'))}), device peak {gib(row.get('device_peak_bytes'))} "
        f"GiB, compile {row['compile_s']:.0f} s"
    )


def alternate(fns: dict, repeats: int, iters: int, settle: float = 0.0) -> dict:
    """Warm each up, then time them in turn, `repeats` rounds; median seconds per call.

    `settle` seconds of sleep before each timing let the previous implementation's worker
    threads go idle: torch's OpenMP threads spin-wait after a step, and a JAX train step timed
    right after torch's was 15% slower than alone (2709 vs 2356 ms, `small`, 2-core CPU); after
    a 0.2 s pause it was not (2409 ms)."""
    for fn in fns.values():
        fn()
        fn()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if settle:
                time.sleep(settle)
            samples[k].append(timed(fn, iters))
    return {k: statistics.median(v) for k, v in samples.items()}


def device_name() -> str:
    import jax

    d = jax.devices()[0]
    if d.platform == "cpu":
        cpu = platform.processor() or platform.machine()
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return f"CPU ({os.cpu_count()} cores: {cpu})"
    return getattr(d, "device_kind", d.platform)


def versions() -> str:
    import flax
    import jax

    parts = [f"jax {jax.__version__}", f"flax {flax.__version__}"]
    try:
        import torch
        import transformers

        parts += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    except ImportError:
        pass
    return ", ".join(parts)


def run_scaling(
    config, lengths, dtype_name, plot_path, repeats=3, batch=1, with_torch=False, settle=0.0
):
    """Forward time vs length: FunnelBaseModel vs the standard Transformer of equal depth.

    Funnel and standard (and, with_torch, the same pair in the PyTorch reference) take turns in
    the same rounds, so the time ratio of each pair is measured under the same machine load."""
    import jax
    import jax.numpy as jnp

    import funnel_jax as fj
    from funnel_jax.flops import model_flops, standard_transformer

    dt = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    impls = ("jax", "torch") if with_torch else ("jax",)
    configs = {"funnel": config, "standard": standard_transformer(config)}
    modules = {k: fj.FunnelBaseModel(config=c, dtype=dt) for k, c in configs.items()}
    params = {k: fj.init_params(m, jax.random.PRNGKey(0), seq_len=16) for k, m in modules.items()}
    torch_models = {}
    if with_torch:
        import torch
        import transformers

        for k, c in configs.items():
            tc = transformers.FunnelConfig(**c.to_dict())
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            torch_models[k] = (transformers.FunnelBaseModel(tc).to(dev).eval(), dev)

    rows = []
    for length in lengths:
        fns = {}
        ids = jnp.ones((batch, length), jnp.int32)
        for k, m in modules.items():
            f = jax.jit(lambda p, x, m=m: m.apply({"params": p}, x).last_hidden_state)
            fns[f"jax_{k}"] = lambda f=f, p=params[k], x=ids: f(p, x).block_until_ready()
        for k, (model, dev) in torch_models.items():
            tids = torch.ones((batch, length), dtype=torch.long, device=dev)
            fns[f"torch_{k}"] = torch_inference(
                model, {"input_ids": tids}, dev, dtype_name == "bfloat16"
            )
        times = alternate(fns, repeats, 1, settle)
        row = {"seq_len": length, "batch": batch}
        row["flop_ratio"] = model_flops(configs["standard"], batch, length, "base") / model_flops(
            config, batch, length, "base"
        )
        line = f"  L={length:5d}"
        for impl in impls:
            prefix = "" if impl == "jax" else "torch_"
            row[f"{prefix}funnel_s"] = times[f"{impl}_funnel"]
            row[f"{prefix}standard_s"] = times[f"{impl}_standard"]
            row[f"{prefix}time_ratio"] = row[f"{prefix}standard_s"] / row[f"{prefix}funnel_s"]
            row[f"{prefix}efficiency"] = row[f"{prefix}time_ratio"] / row["flop_ratio"]
            line += (
                f"  {impl}: funnel {row[f'{prefix}funnel_s'] * 1e3:8.1f} ms, standard "
                f"{row[f'{prefix}standard_s'] * 1e3:8.1f} ms -> "
                f"{100 * row[f'{prefix}efficiency']:.0f}%"
            )
        rows.append(row)
        print(f"{line}  (FLOP ratio {row['flop_ratio']:.2f})", flush=True)
    if plot_path:
        plot_scaling(rows, plot_path, batch)
    return rows


def plot_scaling(rows, plot_path, batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["seq_len"] for r in rows]
    impls = [("", "-", 1.0, "funnel_jax")]
    if "torch_funnel_s" in rows[0]:
        impls.append(("torch_", "--", 0.6, "PyTorch reference"))
    for prefix, line, alpha, impl in impls:
        for model, marker, color in (("funnel", "o", "C0"), ("standard", "s", "C1")):
            ax.plot(
                xs,
                [r[f"{prefix}{model}_s"] * 1e3 for r in rows],
                marker + line,
                c=color,
                alpha=alpha,
                label=f"{'Funnel' if model == 'funnel' else 'standard'}, {impl}",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"forward time, batch {batch} (ms)")
    ax.set_title(f"FunnelBaseModel forward, {device_name()}", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plot_path, dpi=120)
    print(f"plot: {plot_path}")


def scaling_table(rows) -> str:
    """Markdown: per length, both times, the time ratio, the FLOP ratio and their quotient."""
    with_torch = "torch_funnel_s" in rows[0]
    head = "| length | funnel ms | standard ms | time ratio | FLOP ratio | time/FLOP ratio |"
    sep = "|---|---|---|---|---|---|"
    if with_torch:
        head += " torch funnel ms | torch standard ms | torch time/FLOP ratio |"
        sep += "---|---|---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r['seq_len']} | {r['funnel_s'] * 1e3:.1f} | {r['standard_s'] * 1e3:.1f} | "
            f"{r['time_ratio']:.2f} | {r['flop_ratio']:.2f} | {100 * r['efficiency']:.0f}% |"
        )
        if with_torch:
            line += (
                f" {r['torch_funnel_s'] * 1e3:.1f} | {r['torch_standard_s'] * 1e3:.1f} | "
                f"{100 * r['torch_efficiency']:.0f}% |"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    from funnel_jax.runtime import enable_compile_cache, jemalloc_active, use_jemalloc

    use_jemalloc()
    args = parse_args(argv)
    enable_compile_cache(args.compile_cache)
    import jax

    from funnel_jax.flops import model_flops, train_step_flops

    config, config_name = load_config(args.config)
    impls = args.attention_impl.split(",")
    for impl in impls:
        if impl not in ("einsum", "fused_bias"):
            raise SystemExit(f"--attention-impl: {impl!r} is not one of einsum, fused_bias")
    rngs = args.dropout_rng.split(",")
    for rng in rngs:
        if rng not in ("threefry", "hash"):
            raise SystemExit(f"--dropout-rng: {rng!r} is not one of threefry, hash")
    config = config.replace(
        remat_policy=args.remat,
        attention_impl=impls[0],
        scan_layers=args.scan_layers,
        dropout_rng=rngs[0],
    )
    b, length = args.batch_size, args.seq_len
    only = set(args.only.split(","))
    parts = tuple(p for p in ("forward", "train") if p in only)
    print(f"device: {device_name()}  ({versions()})", flush=True)
    print(
        f"config {config_name}, batch {b}, length {length}, {args.dtype}, "
        f"remat {args.remat}, scan_layers {args.scan_layers}",
        flush=True,
    )
    print(f"allocator: {'jemalloc' if jemalloc_active() else 'default'}", flush=True)
    peak = matmul_peak(args.dtype)
    print(f"matmul peak: {peak['peak'] / 1e9:.1f} GFLOP/s", flush=True)

    mm, mm_flops = matmul_fn(args.dtype)
    jbs = {}
    variants = [(impl, rngs[0]) for impl in impls] + [(impls[0], r) for r in rngs[1:]]
    for impl, rng in variants if parts else ():
        label = " ".join(
            ["jax", *([impl] if impl != impls[0] else []), *([rng] * (rng != rngs[0]))]
        )
        # fused_bias has no attention dropout (funnel_jax/layers.py raises): its row runs without.
        drop = {"attention_dropout": 0.0} if impl == "fused_bias" else {}
        jbs[label] = JaxBench(
            config.replace(attention_impl=impl, dropout_rng=rng, **drop),
            b,
            length,
            args.dtype,
            parts,
        )
    tb = tbf = tbc = None
    if not args.no_torch and parts:
        import torch

        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)
        tb = TorchBench(config, b, length, args.dtype, parts=parts)
        if "train" in only:
            tbf = TorchBench(config, b, length, args.dtype, fused=True)
        if args.torch_compile:
            try:
                tbc = TorchBench(config, b, length, args.dtype, compile_=True, parts=parts)
            except Exception as e:  # noqa: BLE001
                print(f"torch.compile unavailable: {e}")
    results = []
    profile_table = ""
    tokens = b * length
    if "forward" in only:
        for name, kind in (("FunnelModel", "full"), ("FunnelBaseModel", "base")):
            fns = {label: jb.forward(name) for label, jb in jbs.items()}
            if tb:
                fns["torch"] = tb.forward(name)
            if tbc:
                fns["torch.compile"] = tbc.forward(name)
            fns["_matmul"] = mm
            times = alternate(fns, args.repeats, args.iters, args.settle)
            group_peak = mm_flops / times.pop("_matmul")
            flops = model_flops(config, b, length, kind)
            results.append((f"forward {name}", times, flops, group_peak))
            print(f"  forward {name}: " + fmt_times(times), flush=True)
    if "train" in only:
        fns = {label: jb.train() for label, jb in jbs.items()}
        if tb:
            fns["torch"] = tb.train()
            fns["torch fused AdamW"] = tbf.train()
        if tbc:
            fns["torch.compile"] = tbc.train()
        fns["_matmul"] = mm
        times = alternate(fns, args.repeats, args.iters, args.settle)
        group_peak = mm_flops / times.pop("_matmul")
        flops = train_step_flops(config, b, length, "pretraining")
        results.append(("train step FunnelForPreTraining", times, flops, group_peak))
        print("  train step: " + fmt_times(times), flush=True)
        xla = jbs["jax"].compiled_flops()
        if xla:
            print(
                f"XLA cost analysis of the train step: {xla / 1e9:.1f} GFLOP "
                f"(analytic {flops / 1e9:.1f} GFLOP)"
            )
    if args.profile and "jax" in jbs and "train" in only:
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                jbs["jax"].train()()
        print(f"profile trace written to {args.profile} (open with TensorBoard / Perfetto)")
        from experiments.profile_summary import summarize

        profile_table = summarize(args.profile, "jit_train_step")
        print(profile_table, flush=True)
    floor_tables = []
    if args.gemm_floor and "jax" in jbs:
        from experiments.gemm_floor import floor_table, gemm_floor

        jb = jbs["jax"]
        targets = []  # (what, compiled program, {impl: callable}), where timed above
        if "forward" in only:
            fwd = {"jax": jb.forward("FunnelModel")} | (
                {"torch": tb.forward("FunnelModel")} if tb else {}
            )
            targets.append(("forward", jb.fwd["FunnelModel"][0], fwd))
        if "train" in only:
            train = {"jax": jb.train()} | ({"torch": tb.train()} if tb else {})
            targets.append(("train step", jb.step, train))
        for what, exe, programs in targets:
            floor = gemm_floor(
                exe.as_text(),
                with_torch=tb is not None,
                repeats=args.repeats,
                programs=programs,
                settle=args.settle,
            )
            floor_tables.append(floor_table(floor, what))
            print(floor_tables[-1], flush=True)
    torch_memory = tb.train_peak_bytes() if tb is not None and "train" in only else None
    torch_memory_batch = b
    del jbs
    memory = []
    mb = args.memory_batch_size or b
    if "memory" in only:
        for policy in args.memory_policies.split(","):
            row = train_memory(config, mb, length, args.dtype, policy)
            memory.append(row)
            print("  memory: " + fmt_memory(row), flush=True)
        if not args.no_torch and torch_memory is None:
            torch_memory = TorchBench(config, mb, length, args.dtype).train_peak_bytes()
            torch_memory_batch = mb

    lines = []
    header = (
        "| what | impl | ms / step | tokens/s | vs torch eager | matmul peak in the same "
        "rounds (GFLOP/s) | MFU |"
    )
    lines += [header, "|---|---|---|---|---|---|---|"]
    for what, times, flops, group_peak in results:
        for impl, t in times.items():
            ratio = times["torch"] / t if "torch" in times else float("nan")
            mfu = flops / t / group_peak
            lines.append(
                f"| {what} | {impl} | {t * 1e3:.1f} | {tokens / t:,.0f} | {ratio:.2f}x | "
                f"{group_peak / 1e9:.0f} | {100 * mfu:.0f}% |"
            )
    if memory:
        lines += [
            "",
            f"Train step memory (batch {memory[0]['batch']}, length {length}, {args.dtype}):",
            "",
            "| remat policy | kept for the backward (GiB) | XLA buffers: args + outputs - "
            "donated + temps (GiB) | temps (GiB) | device peak while running (GiB) | compile s |",
            "|---|---|---|---|---|---|",
        ]
        for r in memory:
            lines.append(
                f"| {r['policy']} | {gib(r['residual_bytes'])} | {gib(r.get('xla_total_bytes'))} "
                f"| {gib(r.get('temp_bytes'))} | {gib(r.get('device_peak_bytes'))} "
                f"| {r['compile_s']:.0f} |"
            )
    if torch_memory:
        lines += [
            "",
            f"PyTorch reference train step (batch {torch_memory_batch}): {gib(torch_memory)} GiB "
            "(step high-water mark + parameters + AdamW state, torch.cuda.max_memory_allocated)",
        ]
    if profile_table:
        lines += ["", "Per-op breakdown of 3 JAX train steps (`--profile`):", "", profile_table]
    for t in floor_tables:
        lines += ["", t]
    table = "\n".join(lines)
    print(table)

    scaling = None
    if args.scaling:
        sb = args.scaling_batch_size
        print(f"scaling (FunnelBaseModel forward, batch {sb}):", flush=True)
        lengths = [int(x) for x in args.scaling_lengths.split(",")]
        scaling = run_scaling(
            config,
            lengths,
            args.dtype,
            args.plot,
            batch=sb,
            with_torch=not args.no_torch,
            settle=args.settle,
        )

    if args.output:
        cli = argv if argv is not None else sys.argv[1:]
        cmd = "python -m experiments.benchmark " + " ".join(cli)
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(f"\n## {config_name}, batch {b}, length {length}, {args.dtype}\n\n")
            f.write(f"- command: `{cmd.strip()}`\n- device: {device_name()}\n")
            f.write(f"- versions: {versions()}\n")
            allocator = "jemalloc (preloaded)" if jemalloc_active() else "default"
            f.write(f"- allocator: {allocator}\n")
            f.write(
                f"- matmul peak before the rounds: {peak['peak'] / 1e9:.1f} GFLOP/s; the MFU "
                "column uses the matmul timed inside the same rounds\n"
            )
            f.write(f"- medians of {args.repeats} alternating rounds of {args.iters} steps\n\n")
            f.write(table + "\n")
            if scaling:
                f.write(
                    "\nFunnel vs standard Transformer (same width and depth, no pooling), "
                    f"FunnelBaseModel forward, batch {args.scaling_batch_size}, the pairs "
                    "alternating in the same rounds:\n\n"
                )
                f.write(scaling_table(scaling) + "\n")
        print(f"appended to {args.output}")
    return {"results": results, "peak": peak, "scaling": scaling, "memory": memory}


if __name__ == "__main__":
    main()
    sys.stdout.flush()
