"""Deviceless ahead-of-time compilation for GPU and TPU targets, and statistics of the result.

    target = parse_target("h200")                  # or "h100", "tpu:v5p:4x4x4", "cpu"
    devices = target_devices(target)               # abstract devices: nothing is allocated
    mesh = sharding.make_mesh("fsdp=4", devices=devices)
    program = build_train_step(config, mesh, batch_size=16, seq_len=512, dtype="bfloat16")
    report = compile_program(program, mesh)        # lower + compile inside use_mesh(mesh)
    report["hlo"]["kernels"], report["memory"]["peak"]

On a CPU-only machine `jax.experimental.topologies.get_topology_desc` gives the devices of a
GPU (CUDA plugin, `jax[cuda13]`, with a GpuTargetConfig text proto from `configs/targets/`) or
of a TPU slice (libtpu, `jax[tpu]`), and `jit(...).lower(abstract args).compile()` produces the
real program for them (sm_90 kernels; TPU collectives), without autotuning, so the compile times
are a lower bound. `cpu` compiles for the host's own devices (what CI tests).

HLO statistics (`hlo_stats(text)`) are read from the compiled program's text:
- kernels: fusions plus custom calls (library GEMMs, cuDNN) in the non-fused computations
  (the entry, loop bodies and conditions, branches, async and command-buffer wrappers). A loop
  body counts once: this is the static program size that drives the compile time.
- fusions by kind (kLoop / kInput / kOutput / kCustom and, for kCustom, the backend kind:
  `__triton_gemm` is a Triton GEMM, `__cudnn$fusion` a cuDNN graph);
- custom calls by target: `__cublas$gemm` / `__cublas$lt$matmul*` (cuBLAS), `__cudnn$*`;
- collectives by kind (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute,
  the `-start` of async pairs counted once) with their bytes per device (the larger of the
  operands and the results: the gathered side of an all-gather, the scattered input of a
  reduce-scatter).
- estimated cycles (TPU): the sum of the `estimated_cycles` that the TPU compiler's cost model
  writes into each top-level instruction's backend config, a loop body's counted as many times
  as the loop runs (its trip count, from the backend config or the condition's `i < N`). A
  static estimate of the step's compute, not a measurement: collectives and DMA waits are not
  in it. 0 where the compiler writes none (GPU, CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_CONFIG_DIR = REPO_ROOT / "configs" / "targets"
GPU_TARGETS = ("h100", "h200")


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class Target:
    """What to compile for.

    kind: "cpu" | "gpu" | "tpu"; name: "cpu", "h200", "v5p:4x4x4"; topology: the GPU topology
    "<slices>x<hosts per slice>x<devices per host>" or the TPU topology name; target_config: the
    GpuTargetConfig text-proto file (GPU only).
    """

    kind: str
    name: str
    topology: str | None = None
    target_config: Path | None = None

    @property
    def platform(self) -> str:
        return {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}[self.kind]


_GPU_TOPOLOGY = re.compile(r"^\d+x\d+x\d+$")


def parse_target(text: str, target_config: str | os.PathLike | None = None) -> Target:
    """'cpu' | 'h200' | 'h100' | 'h200:1x1x8' | 'tpu:v5p:4x4x4' (any TPU topology name).

    A GPU target reads `configs/targets/<name>.txtpb` unless `target_config` names a file.
    """
    text = str(text).strip()
    low = text.lower()
    if low == "cpu":
        return Target("cpu", "cpu")
    if low.startswith("tpu:"):
        topo = text[4:]
        if not re.match(r"^v\w+[:\-]\S+$", topo):
            raise ValueError(
                f"--target {text!r}: expected tpu:<generation>:<topology>, e.g. tpu:v5p:4x4x4 "
                "or tpu:v5e:2x2"
            )
        return Target("tpu", topo, topology=topo)
    name, _, topo = low.partition(":")
    if name in GPU_TARGETS:
        topo = topo or "1x1x1"
        if not _GPU_TOPOLOGY.match(topo):
            raise ValueError(
                f"--target {text!r}: GPU topology must be <slices>x<hosts>x<devices per host>, "
                f"e.g. {name}:1x1x8; got {topo!r}"
            )
        path = Path(target_config) if target_config else TARGET_CONFIG_DIR / f"{name}.txtpb"
        if not path.is_file():
            raise ValueError(f"--target {text!r}: GPU target config {path} does not exist")
        return Target("gpu", name, topology=topo, target_config=path)
    raise ValueError(
        f"--target {text!r}: unknown target; expected cpu, {', '.join(GPU_TARGETS)} "
        "(optionally :<slices>x<hosts>x<devices>) or tpu:<generation>:<topology>"
    )


def target_devices(target: Target) -> list:
    """The target's devices: the host's own for cpu, abstract (deviceless) ones otherwise."""
    if target.kind == "cpu":
        return list(jax.devices("cpu"))
    from jax.experimental import topologies

    if target.kind == "gpu":
        topo = topologies.get_topology_desc(
            platform="cuda",
            topology=target.topology,
            target_config=target.target_config.read_text(),
        )
    else:
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    return list(topo.devices)


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
    """A jitted function and abstract (ShapeDtypeStruct, sharded) arguments to lower it on."""

    name: str
    fn: Callable
    args: tuple
    model_flops: int  # analytic, from funnel_jax/flops.py (forward, or 3x forward for a step)


def _dtype(name: str):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _batch_specs(batch_size: int, seq_len: int, mesh, labels: bool = False) -> dict:
    from funnel_jax import sharding

    sh = sharding.batch_sharding(mesh)
    names = ["input_ids", "attention_mask", "token_type_ids"] + (["labels"] if labels else [])
    return {n: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sh) for n in names}


def synthetic_special_ids(vocab_size: int):
    """Special-token ids for compiling (pad 0, unk 100, cls 101, sep 102, mask 103 as in BERT's
    uncased WordPiece vocabulary that Funnel ships); the values do not change the program."""
    from funnel_jax.data import SpecialIds

    return SpecialIds(
        cls=101, sep=102, pad=0, mask=103, all=(0, 100, 101, 102, 103), vocab_size=vocab_size
    )


def load_pretrain_preset(name_or_path: str = "large") -> dict:
    """The objective and optimizer sections of a configs/pretrain/ preset (or a JSON file)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = REPO_ROOT / "configs" / "pretrain" / f"{name_or_path}.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def electra_step_flops(config, objective_cfg, batch: int, seq_len: int) -> int:
    """Analytic FLOPs of one ELECTRA train step: 3x (discriminator forward + generator forward)."""
    from funnel_jax.electra import generator_config, num_predictions
    from funnel_jax.flops import model_flops

    gen = generator_config(config, objective_cfg.generator_size)
    p = num_predictions(seq_len, objective_cfg.mask_prob)
    d, dg = config.d_model, gen.d_model
    gen_fwd = model_flops(gen, batch, seq_len, "full")
    if d != dg:
        gen_fwd += 2 * batch * seq_len * d * dg  # input projection
    gen_fwd += 2 * batch * p * (dg * d + d * config.vocab_size)  # MLM head at the targets
    return 3 * (model_flops(config, batch, seq_len, "pretraining") + gen_fwd)


def build_train_step(
    config,
    mesh,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    step: str = "electra",
    pretrain_preset: str = "large",
) -> Program:
    """The full pretraining train step (dropout on), jitted with the mesh's shardings.

    step="electra": the project's own step (electra.make_objective + optim.make_optimizer +
    train_state.make_train_step, the settings of `configs/pretrain/<preset>.json`), state
    donated. step="public": what a user writes with the public API: FunnelForPreTraining's
    discriminator loss via `labels=`, `optax.adamw(1e-4)`, jax.value_and_grad.
    """
    import flax.linen as nn
    import optax

    from funnel_jax import sharding
    from funnel_jax.electra import ObjectiveConfig, make_objective
    from funnel_jax.flops import train_step_flops
    from funnel_jax.models import FunnelForPreTraining
    from funnel_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from funnel_jax.train_state import TrainState, jit_train_step, make_train_step

    dt = _dtype(dtype)
    key = jax.random.PRNGKey(0)
    if step == "electra":
        preset = load_pretrain_preset(pretrain_preset)
        obj_cfg = ObjectiveConfig.from_dict(preset["objective"])
        opt_cfg = OptimizerConfig.from_dict(preset["optimizer"])
        total = int(preset.get("train", {}).get("steps", 1_000_000))
        objective = make_objective(
            config, obj_cfg, synthetic_special_ids(config.vocab_size), seq_len, dtype=dt
        )
        tx = make_optimizer(opt_cfg, total)
        boxed = jax.eval_shape(lambda: objective.init(key, unbox=False))
        params_sh = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
        step_fn = make_train_step(
            objective.loss,
            tx,
            grad_accum_steps=opt_cfg.grad_accum_steps,
            learning_rate_fn=learning_rate_schedule(opt_cfg, total),
        )
        abstract_state = jax.eval_shape(lambda: TrainState.create(objective.init(key), tx, key))
        state_sh = sharding.tree_shardings_like_params(abstract_state, params_sh, mesh)
        batch = _batch_specs(batch_size, seq_len, mesh)
        with sharding.use_mesh(mesh):
            fn = jit_train_step(step_fn, shardings=(state_sh, sharding.batch_sharding(mesh)))
        flops = electra_step_flops(config, obj_cfg, batch_size, seq_len)
        return Program("train_step", fn, (_abstract(abstract_state, state_sh), batch), flops)
    if step != "public":
        raise ValueError(f"step must be 'electra' or 'public', got {step!r}")
    module = FunnelForPreTraining(config=config, dtype=dt)
    tx = optax.adamw(1e-4)
    params_sh = sharding.param_shardings(module, mesh)

    def make_state():
        params = module.init({"params": key}, jnp.zeros((1, seq_len), jnp.int32))["params"]
        params = nn.meta.unbox(params)
        return params, tx.init(params), key

    abstract_state = jax.eval_shape(make_state)
    state_sh = sharding.tree_shardings_like_params(abstract_state, params_sh, mesh)

    def public_step(state, batch):
        params, opt_state, rng = state
        rng, drop = jax.random.split(rng)

        def loss_fn(p):
            out = module.apply(
                {"params": p},
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                labels=batch["labels"],
                deterministic=False,
                rngs={"dropout": drop},
            )
            return out.loss

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, rng), loss

    batch = _batch_specs(batch_size, seq_len, mesh, labels=True)
    batch_sh = jax.tree.map(lambda s: s.sharding, batch)
    with sharding.use_mesh(mesh):
        fn = jax.jit(
            public_step,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None),
            donate_argnums=(0,),
        )
    flops = train_step_flops(config, batch_size, seq_len, "pretraining")
    return Program("train_step", fn, (_abstract(abstract_state, state_sh), batch), flops)


def build_forward(config, mesh, *, batch_size: int, seq_len: int, dtype: str = "bfloat16"):
    """FunnelForPreTraining's forward (deterministic): logits [B, L] from sharded params."""
    from funnel_jax import sharding
    from funnel_jax.flops import model_flops
    from funnel_jax.models import FunnelForPreTraining, abstract_params

    module = FunnelForPreTraining(config=config, dtype=_dtype(dtype))
    params_sh = sharding.param_shardings(module, mesh)
    params = _abstract(abstract_params(module), params_sh)
    batch = _batch_specs(batch_size, seq_len, mesh)

    def forward(p, b):
        return module.apply(
            {"params": p}, b["input_ids"], b["attention_mask"], b["token_type_ids"]
        ).logits

    with sharding.use_mesh(mesh):
        fn = jax.jit(forward, in_shardings=(params_sh, sharding.batch_sharding(mesh)))
    flops = model_flops(config, batch_size, seq_len, "pretraining")
    return Program("forward", fn, (params, batch), flops)


def compile_program(
    program: Program, mesh, compiler_options: Mapping[str, Any] | None = None
) -> dict:
    """Lower and compile inside the mesh context; times, HLO statistics and memory per device."""
    from funnel_jax import sharding

    with sharding.use_mesh(mesh):
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = program.fn.lower(*program.args)
        t1, c1 = time.perf_counter(), time.process_time()
        compiled = lowered.compile(compiler_options=dict(compiler_options or {}))
        t2, c2 = time.perf_counter(), time.process_time()
    text = compiled.as_text()
    return {
        "program": program.name,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        # CPU seconds of this process (all its threads): less sensitive to a shared machine
        "lower_cpu_s": c1 - c0,
        "compile_cpu_s": c2 - c1,
        "hlo": hlo_stats(text),
        "memory": memory_stats(compiled),
        "model_flops": program.model_flops,
        "hlo_text": text,
    }


def memory_stats(compiled) -> dict[str, int]:
    """Bytes per device from `compiled.memory_analysis()`: arguments, outputs, aliased
    (donated) bytes, temporaries, generated code, and peak (XLA's figure when it gives one,
    else arguments + outputs - aliased + temporaries)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    if isinstance(ma, list | tuple):  # one entry per addressable device on some versions
        ma = ma[0]
    out = {
        "arguments": int(ma.argument_size_in_bytes),
        "outputs": int(ma.output_size_in_bytes),
        "aliased": int(ma.alias_size_in_bytes),
        "temporaries": int(ma.temp_size_in_bytes),
        "generated_code": int(ma.generated_code_size_in_bytes),
    }
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    out["peak"] = peak or out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


# --------------------------------------------------------------------------- HLO text

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
    "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(
    r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\]"
)
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-$]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-$]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
)


def array_bytes(shape_text: str) -> int:
    """Total bytes of every array type in `shape_text` ('bf16[8,128]{1,0}', tuples too)."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _DTYPE_BYTES[dtype]
    return total


def _split_computations(text: str) -> dict[str, list[str]]:
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = ("ENTRY" if m.group(1) else "") + "|" + m.group(2)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        comps[current].append(line)
    return comps


def _tuple_elements(shape: str) -> list[str]:
    """Top-level elements of a tuple shape '(a, (b, c))' -> ['a', '(b, c)']; [shape] if none."""
    shape = shape.strip()
    if not shape.startswith("("):
        return [shape]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(shape):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                parts.append(shape[start:i])
                break
        elif ch == "," and depth == 1:
            parts.append(shape[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def _operands_text(rest: str) -> str:
    """The text inside the instruction's operand parentheses (rest starts after '(')."""
    depth = 1
    for i, ch in enumerate(rest):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return rest[:i]
    return rest


def _collective_bytes(op: str, shape: str, rest: str) -> int:
    base = op[: -len("-start")] if op.endswith("-start") else op
    operands = array_bytes(_operands_text(rest))
    result = array_bytes(shape)
    if op.endswith("-start") and base in ("all-gather", "collective-permute"):
        parts = _tuple_elements(shape)  # (operands, results[, contexts])
        result = array_bytes(parts[1]) if len(parts) >= 2 else result
    return max(operands, result)


def _fused_collectives(rest: str, parsed, short) -> list[tuple[str, int]]:
    """Collectives inside a fusion's computation (TPU fuses them: an `all-reduce-scatter`
    computation is an all-reduce of the full gradient whose result is sliced in place, i.e. a
    reduce-scatter; other fused collectives keep their kind)."""
    called = re.findall(r"calls=%?([\w.\-$]+)", rest)
    out = []
    for comp in called:
        rows = parsed.get(short.get(comp, ""), [])
        for _, shape, op, orest in rows:
            base = op[: -len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES or op.endswith("-done"):
                continue
            kind = "reduce-scatter" if comp.startswith("all-reduce-scatter") else base
            out.append((kind, _collective_bytes(op, shape, orest)))
    return out


_CYCLES = re.compile(r'"estimated_cycles"\s*:\s*"?(\d+)')
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _loop_trip_count(rest: str, parsed, short) -> int | None:
    """Trip count of a `while`: the backend config's known_trip_count, else a condition whose
    root is `compare(i, constant(N)), direction=LT` (a scan from 0); None if neither."""
    m = _TRIP_COUNT.search(rest)
    if m:
        return int(m.group(1))
    cond = re.search(r"condition=%?([\w.\-$]+)", rest)
    rows = parsed.get(short.get(cond.group(1), ""), []) if cond else []
    constants = {}
    for name, _shape, op, orest in rows:
        if op == "constant":
            c = re.match(r"\s*(-?\d+)\)", orest)
            if c:
                constants[name] = int(c.group(1))
    for _name, _shape, op, orest in rows:
        if op == "compare" and "direction=LT" in orest:
            args = re.findall(r"%([\w.\-$]+)", _operands_text(orest))
            if len(args) == 2 and args[1] in constants:
                return constants[args[1]]
    return None


def _execution_counts(parsed, short, fused: set[str]) -> tuple[dict[str, int], int]:
    """How many times each non-fused computation runs per call of the entry (loop bodies: their
    trip counts, nested loops multiplied), and how many loops had no readable trip count (they
    count once)."""
    entry = next((name for name in parsed if name.startswith("ENTRY|")), None)
    counts = {entry: 1} if entry else {}
    unknown = 0
    frontier = [entry] if entry else []
    while frontier:
        comp = frontier.pop()
        for _, _, op, rest in parsed[comp]:
            edges = []
            if op == "while":
                n = _loop_trip_count(rest, parsed, short)
                unknown += n is None
                body = re.search(r"body=%?([\w.\-$]+)", rest)
                if body:
                    edges.append((body.group(1), 1 if n is None else n))
            elif op != "fusion":
                for attr in ("to_apply", "calls", "branch_computations"):
                    for group in re.findall(attr + r"=\{?([^}=]*?)\}?(?:,\s*\w+=|$)", rest):
                        edges += [(c, 1) for c in re.findall(r"%?([\w.\-$]+)", group)]
            for callee, n in edges:
                full = short.get(callee)
                if full is None or callee in fused or full in counts:
                    continue
                counts[full] = counts[comp] * n
                frontier.append(full)
    return counts, unknown


def hlo_stats(text: str) -> dict[str, Any]:
    """Counts of an optimised HLO module's text (see the module docstring for definitions)."""
    comps = _split_computations(text)
    parsed: dict[str, list[tuple[str, str, str, str]]] = {}
    for name, lines in comps.items():
        rows = []
        for line in lines:
            m = _INSTR.match(line)
            if m:
                rows.append((m.group(1), m.group(2), m.group(3), m.group(4)))
        parsed[name] = rows
    short = {name.split("|", 1)[1]: name for name in parsed}

    # Computations that are the body of a fusion (transitively: nested fusions inside them).
    fused: set[str] = set()
    frontier = []
    for rows in parsed.values():
        for _, _, op, rest in rows:
            if op == "fusion":
                frontier += re.findall(r"calls=%?([\w.\-$]+)", rest)
    while frontier:
        c = frontier.pop()
        if c in fused or c not in short:
            continue
        fused.add(c)
        for _, _, _op, rest in parsed[short[c]]:
            frontier += re.findall(r"calls=%?([\w.\-$]+)", rest)
            frontier += re.findall(r"to_apply=%?([\w.\-$]+)", rest)

    runs, unknown_trips = _execution_counts(parsed, short, fused)
    estimated_cycles = 0
    fusion_kinds: Counter = Counter()
    custom_calls: Counter = Counter()
    collectives: dict[str, dict[str, int]] = {}
    instructions = 0
    kernels = 0
    for name, rows in parsed.items():
        if name.split("|", 1)[1] in fused:
            continue
        for _, shape, op, rest in rows:
            instructions += 1
            cycles = _CYCLES.search(rest)
            if cycles:
                estimated_cycles += int(cycles.group(1)) * runs.get(name, 1)
            if op == "fusion":
                kernels += 1
                for kind_, nbytes in _fused_collectives(rest, parsed, short):
                    entry = collectives.setdefault(kind_, {"count": 0, "bytes": 0})
                    entry["count"] += 1
                    entry["bytes"] += nbytes
                kind = re.search(r"kind=(k\w+)", rest)
                kind = kind.group(1) if kind else "?"
                backend = re.search(r'"kind"\s*:\s*"([^"]+)"', rest)
                if kind == "kCustom" and backend:
                    kind = f"kCustom:{backend.group(1)}"
                fusion_kinds[kind] += 1
            elif op == "custom-call":
                kernels += 1
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                custom_calls[target.group(1) if target else "?"] += 1
            base = op[: -len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES and not op.endswith("-done"):
                entry = collectives.setdefault(base, {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += _collective_bytes(op, shape, rest)
    triton = sum(n for k, n in fusion_kinds.items() if "triton_gemm" in k or "triton_nested" in k)
    cublas = sum(n for k, n in custom_calls.items() if k.startswith("__cublas"))
    cudnn = sum(n for k, n in custom_calls.items() if k.startswith("__cudnn"))
    cudnn += sum(n for k, n in fusion_kinds.items() if "cudnn" in k)
    return {
        "kernels": kernels,
        "fusions": int(sum(fusion_kinds.values())),
        "fusion_kinds": dict(sorted(fusion_kinds.items())),
        "custom_calls": dict(sorted(custom_calls.items())),
        "cublas_gemms": cublas,
        "cudnn_calls": cudnn,
        "triton_gemms": triton,
        "collectives": dict(sorted(collectives.items())),
        "while_loops": sum(op == "while" for rows in parsed.values() for _, _, op, _ in rows),
        "instructions": instructions,
        "computations": len(parsed),
        "estimated_cycles": estimated_cycles,
        "loops_without_trip_count": unknown_trips,
    }


# --------------------------------------------------------------------------- settings


def parse_compiler_options(items) -> dict[str, Any]:
    """['xla_gpu_enable_triton_gemm=false', ...] -> {name: bool | int | str}."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"compiler option: expected NAME=VALUE, got {item!r}")
        low = value.strip().lower()
        if low in ("true", "false"):
            out[name.strip()] = low == "true"
        elif re.fullmatch(r"-?\d+", low):
            out[name.strip()] = int(low)
        else:
            out[name.strip()] = value.strip()
    return out


def apply_jax_settings(settings: Mapping[str, Any]) -> None:
    """jax.config.update for each (name, value), e.g. jax_threefry_gpu_kernel_lowering."""
    for name, value in settings.items():
        jax.config.update(name, value)
