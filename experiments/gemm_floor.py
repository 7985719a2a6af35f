"""The matrix products of a compiled program, each timed alone, against the whole program.

    python -m experiments.benchmark --only train --gemm-floor     # the benchmark's train step

Reads every `dot` of XLA's optimised HLO (inside fusions too) with its operand shapes and
dimension numbers, times each distinct product on its own (a jitted `lax.dot_general` of the
same shapes; with torch, the same contraction as a `torch.einsum`, i.e. MKL on CPU), and sums
over the program. The sum is what the step would cost doing nothing but its matrix products, one
at a time, each as fast as alone: a step well above it spends time elsewhere (memory-bound ops,
layout copies, products slowed down inside the program); a step at or below it (independent
products can overlap on several cores) has nothing left to remove but the products' own time.
The torch column says how much a faster matrix-product library alone would buy.

Products inside a `while` body (scan_layers) are counted once per appearance, not per trip.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import statistics
import time

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One contraction: operand shapes and dot_general dimension numbers."""

    dtype: str
    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    lhs_contract: tuple[int, ...]
    rhs_contract: tuple[int, ...]
    lhs_batch: tuple[int, ...]
    rhs_batch: tuple[int, ...]

    @property
    def flops(self) -> int:
        free_l = [d for i, d in enumerate(self.lhs) if i not in self.lhs_contract + self.lhs_batch]
        free_r = [d for i, d in enumerate(self.rhs) if i not in self.rhs_contract + self.rhs_batch]
        batch = [self.lhs[i] for i in self.lhs_batch]
        k = [self.lhs[i] for i in self.lhs_contract]
        return 2 * math.prod(batch) * math.prod(free_l) * math.prod(free_r) * math.prod(k)

    def describe(self) -> str:
        def dims(shape, contract, batch):
            return (
                "["
                + ",".join(
                    f"{d}{'*' if i in contract else 'b' if i in batch else ''}"
                    for i, d in enumerate(shape)
                )
                + "]"
            )

        return (
            f"{dims(self.lhs, self.lhs_contract, self.lhs_batch)} x "
            f"{dims(self.rhs, self.rhs_contract, self.rhs_batch)}"
        )


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x) if text else ()


def _dims(attr: str, rest: str) -> tuple[int, ...]:
    m = re.search(attr + r"=\{([\d,]*)\}", rest)
    return _ints(m.group(1)) if m else ()


def parse_gemms(hlo_text: str) -> collections.Counter:
    """{Gemm: number of appearances} of every `dot` in optimised HLO text."""
    shapes: dict[tuple[str, str], tuple[str, tuple[int, ...]]] = {}
    dots = []
    comp = ""
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op, rest = m.groups()
        shapes[(comp, name)] = (dtype, _ints(dims))
        if op == "dot":
            dots.append((comp, rest))
    gemms: collections.Counter = collections.Counter()
    for comp, rest in dots:
        operands = re.match(r"%?([\w.\-]+), %?([\w.\-]+)\)", rest)
        if not operands:
            continue
        (lt, lhs), (_, rhs) = (shapes[(comp, o)] for o in operands.groups())
        gemm = Gemm(
            dtype=lt,
            lhs=lhs,
            rhs=rhs,
            lhs_contract=_dims("lhs_contracting_dims", rest),
            rhs_contract=_dims("rhs_contracting_dims", rest),
            lhs_batch=_dims("lhs_batch_dims", rest),
            rhs_batch=_dims("rhs_batch_dims", rest),
        )
        gemms[gemm] += 1
    return gemms


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _einsum(g: Gemm) -> str:
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs = [next(letters) for _ in g.lhs]
    rhs = [next(letters) for _ in g.rhs]
    for li, ri in zip(g.lhs_contract + g.lhs_batch, g.rhs_contract + g.rhs_batch, strict=True):
        rhs[ri] = lhs[li]
    out = [lhs[i] for i in g.lhs_batch]
    out += [c for i, c in enumerate(lhs) if i not in g.lhs_contract + g.lhs_batch]
    out += [c for i, c in enumerate(rhs) if i not in g.rhs_contract + g.rhs_batch]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


def jax_gemm(g: Gemm):
    """A no-argument callable running g once in JAX (compiled, inputs ready)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype({"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(g.dtype, "float32"))
    a = jax.random.normal(jax.random.PRNGKey(0), g.lhs, dt)
    b = jax.random.normal(jax.random.PRNGKey(1), g.rhs, dt)
    dims = ((g.lhs_contract, g.rhs_contract), (g.lhs_batch, g.rhs_batch))
    f = jax.jit(lambda x, y: jax.lax.dot_general(x, y, dims))
    return lambda: f(a, b).block_until_ready()


def torch_gemm(g: Gemm):
    """The same contraction as a torch.einsum (MKL on CPU), a no-argument callable."""
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"bf16": torch.bfloat16, "f16": torch.float16}.get(g.dtype, torch.float32)
    a = torch.randn(g.lhs, dtype=dt, device=dev)
    b = torch.randn(g.rhs, dtype=dt, device=dev)
    eq = _einsum(g)

    def run():
        with torch.inference_mode():
            torch.einsum(eq, a, b)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run


def gemm_floor(
    hlo_text: str,
    with_torch: bool,
    repeats: int = 5,
    programs: dict | None = None,
    settle: float = 0.0,
) -> dict:
    """Each distinct product of the program timed alone, and `programs` ({name: callable}, the
    whole steps) timed in the same rounds, so that the two compare under the same machine
    state; `settle` seconds idle before each program and each library's products. Medians over
    `repeats` rounds; rows sorted by total XLA time."""
    programs = dict(programs or {})
    rows = []
    for g, count in parse_gemms(hlo_text).items():
        row = {"gemm": g, "count": count, "run": {"xla": jax_gemm(g)}, "samples": {"xla": []}}
        if with_torch:
            row["run"]["torch"] = torch_gemm(g)
            row["samples"]["torch"] = []
        rows.append(row)
    for row in rows:
        for run in row["run"].values():
            run()  # compile / warm up
    program_samples = {name: [] for name in programs}
    libs = ["xla", "torch"] if with_torch else ["xla"]
    for _ in range(repeats):
        for name, fn in programs.items():
            time.sleep(settle)
            program_samples[name].append(_seconds(fn))
        for lib in libs:  # one library's products back to back: torch's spinning OpenMP
            time.sleep(settle)  # threads would slow the XLA product timed right after
            for row in rows:
                row["samples"][lib].append(_seconds(row["run"][lib]))
    for row in rows:
        for lib, samples in row.pop("samples").items():
            row[f"{lib}_s"] = statistics.median(samples)
        del row["run"]
    rows.sort(key=lambda r: -r["count"] * r["xla_s"])
    total = lambda key: sum(r["count"] * r[key] for r in rows)  # noqa: E731
    return {
        "rows": rows,
        "flops": sum(r["count"] * r["gemm"].flops for r in rows),
        "xla_s": total("xla_s"),
        "torch_s": total("torch_s") if with_torch else None,
        "programs": {k: statistics.median(v) for k, v in program_samples.items()},
    }


def floor_table(floor: dict, what: str = "train step", top: int = 12) -> str:
    """Markdown: the totals against the whole programs timed in the same rounds, then the
    costliest products."""
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    gflops = floor["flops"] / 1e9
    lines = [
        f"Matrix products of the JAX {what}, each timed alone: {len(floor['rows'])} distinct, "
        f"{sum(r['count'] for r in floor['rows'])} in all, {gflops:.1f} GFLOP; medians of "
        "rounds in which the whole programs were timed too.",
        "",
        "| | ms / step | GFLOP/s over the products |",
        "|---|---|---|",
        f"| products alone, XLA | {ms(floor['xla_s'])} | {gflops / floor['xla_s']:.0f} |",
    ]
    if floor["torch_s"]:
        lines.append(
            f"| the same products alone, torch.einsum | {ms(floor['torch_s'])} | "
            f"{gflops / floor['torch_s']:.0f} |"
        )
    for name, seconds in floor["programs"].items():
        lines.append(f"| whole {what}, {name} | {ms(seconds)} | {gflops / seconds:.0f} |")
    lines += [
        "",
        "| product (`*` contracted, `b` batch) | count | XLA ms each | torch ms each |",
        "|---|---|---|---|",
    ]
    for r in floor["rows"][:top]:
        t = ms(r["torch_s"]) if "torch_s" in r else "-"
        lines.append(
            f"| {r['gemm'].dtype} {r['gemm'].describe()} | {r['count']} | {ms(r['xla_s'])} | {t} |"
        )
    return "\n".join(lines)
