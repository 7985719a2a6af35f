"""The speed tooling runs end to end on a tiny config and reports what it claims to."""

from __future__ import annotations

import gzip
import json

import pytest

from experiments import benchmark, gemm_floor, profile_summary

TINY = dict(
    vocab_size=96,
    block_sizes=[1, 2],
    d_model=32,
    n_head=2,
    d_head=16,
    d_inner=64,
    num_decoder_layers=2,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    config = root / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = root / "BENCH.md"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUNNEL_JAX_NO_JEMALLOC", "1")  # main() would re-execute itself with jemalloc
        result = benchmark.main(
            [
                "--config",
                str(config),
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--repeats",
                "1",
                "--iters",
                "1",
                "--settle",
                "0.01",
                "--only",
                "train,memory",
                "--memory-policies",
                "full",
                "--attention-impl",
                "einsum,fused_bias",
                "--profile",
                str(root / "prof"),
                "--gemm-floor",
                "--scaling",
                "--scaling-lengths",
                "32,64",
                "--scaling-batch-size",
                "2",
                "--plot",
                str(root / "scaling.png"),
                "--output",
                str(out),
            ]
        )
    return result, out.read_text(), root


def test_rows_for_every_implementation(run):
    result, _, _ = run
    rows = {(what, impl) for what, times, _, _ in result["results"] for impl in times}
    train = "train step FunnelForPreTraining"
    assert {(train, "jax"), (train, "jax fused_bias"), (train, "torch")} <= rows
    assert (train, "torch fused AdamW") in rows
    for _, times, flops, peak in result["results"]:
        assert flops > 0 and peak > 0
        assert all(t > 0 for t in times.values())


def test_memory_row_of_the_compiled_step(run):
    result, _, _ = run
    (row,) = result["memory"]
    assert row["policy"] == "full" and row["batch"] == 2
    assert 0 < row["residual_bytes"] and 0 < row["temp_bytes"] < row["xla_total_bytes"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_shrinks_what_the_backward_keeps(scan_layers):
    """Residual bytes of the loss's vjp, per remat policy: `full` keeps only each layer's inputs
    (and the masks), `dots` the matmul outputs; both far below no remat. Tracing only."""
    import jax

    import funnel_jax as fj
    from funnel_jax.config import FunnelConfig

    kept = {}
    for policy in ("none", "dots", "full"):
        config = FunnelConfig(**TINY, remat_policy=policy, scan_layers=scan_layers)
        module = fj.FunnelForPreTraining(config=config)
        params = fj.abstract_params(module)
        inputs, labels = benchmark.jax_batch(config, 8, 256)
        kept[policy] = benchmark.residual_bytes(module, params, inputs, labels)
    assert jax.tree.leaves(params)
    assert kept["full"] * 5 < kept["none"], kept
    assert kept["full"] < kept["dots"] < kept["none"], kept


def test_markdown_holds_the_command_tables_and_profile(run):
    _, text, _ = run
    assert "- command: `python -m experiments.benchmark --config" in text
    assert "| train step FunnelForPreTraining | jax fused_bias |" in text
    assert "| remat policy | kept for the backward (GiB) |" in text and "| full |" in text
    assert "Per-op breakdown" in text and "| op kind | ops | ms | share |" in text


def test_scaling_pairs_funnel_and_standard_for_both_implementations(run):
    result, text, root = run
    rows = result["scaling"]
    assert [r["seq_len"] for r in rows] == [32, 64] and all(r["batch"] == 2 for r in rows)
    for r in rows:
        assert r["flop_ratio"] > 1  # pooling removes work
        for prefix in ("", "torch_"):
            assert r[f"{prefix}funnel_s"] > 0 and r[f"{prefix}standard_s"] > 0
            ratio = r[f"{prefix}standard_s"] / r[f"{prefix}funnel_s"]
            assert r[f"{prefix}efficiency"] == pytest.approx(ratio / r["flop_ratio"])
    assert (root / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "FunnelBaseModel forward, batch 2" in text and "torch time/FLOP ratio" in text


def _event(pid, name, dur, module="jit_train_step"):
    args = {"hlo_op": name, "hlo_module": module}
    return {"ph": "X", "pid": pid, "tid": 1, "ts": 0, "dur": dur, "name": name, "args": args}


def test_profile_summary_sums_device_ops_by_kind(tmp_path):
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        _event(2, "fusion.1", 30.0),
        _event(2, "fusion.2", 10.0),
        _event(2, "dot.7", 60.0),
        _event(2, "dot.8", 5.0, module="jit_other"),
        _event(1, "host_side.3", 1000.0),  # host events are ignored when device ones exist
        {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 99.0, "name": "no hlo op"},
    ]
    d = tmp_path / "plugins" / "profile" / "run"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)

    times = profile_summary.op_times(tmp_path, "jit_train_step")
    assert times == {"fusion.1": 30.0, "fusion.2": 10.0, "dot.7": 60.0}
    table = profile_summary.summarize(tmp_path, "jit_train_step")
    assert "| dot | 1 | 0.1 | 60.0% |" in table
    assert "| fusion | 2 | 0.0 | 40.0% |" in table


def test_alternate_lets_threads_settle_before_every_timing(monkeypatch):
    events = []
    monkeypatch.setattr(benchmark.time, "sleep", lambda s: events.append(("sleep", s)))
    fns = {"a": lambda: events.append(("a",)), "b": lambda: events.append(("b",))}
    times = benchmark.alternate(fns, repeats=2, iters=1, settle=0.25)
    assert set(times) == {"a", "b"}
    timed_calls = events[4:]  # after two warm-up calls of each
    assert timed_calls == [("sleep", 0.25), ("a",), ("sleep", 0.25), ("b",)] * 2
    events.clear()
    benchmark.alternate(fns, repeats=1, iters=1)  # settle 0: no sleeping
    assert ("sleep", 0.25) not in events and len(events) == 6


def test_gemm_floor_finds_every_product_of_a_compiled_program():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    def f(a, b, c, d):
        return a @ b, jnp.einsum("bij,bkj->bik", c, d)  # the second contracts rhs dim 2

    args = [
        np.random.RandomState(i).randn(*shape).astype(np.float32)
        for i, shape in enumerate([(64, 32), (32, 16), (4, 8, 16), (4, 8, 16)])
    ]
    hlo = jax.jit(f).lower(*args).compile().as_text()
    gemms = gemm_floor.parse_gemms(hlo)
    assert sum(gemms.values()) == 2
    assert sorted(g.flops for g in gemms) == sorted([2 * 64 * 32 * 16, 2 * 4 * 8 * 8 * 16])
    for g in gemms:  # the torch contraction computes what XLA's dot does
        a = np.random.RandomState(0).randn(*g.lhs).astype(np.float32)
        b = np.random.RandomState(1).randn(*g.rhs).astype(np.float32)
        dims = ((g.lhs_contract, g.rhs_contract), (g.lhs_batch, g.rhs_batch))
        expected = np.asarray(jax.lax.dot_general(a, b, dims))
        got = torch.einsum(gemm_floor._einsum(g), torch.tensor(a), torch.tensor(b)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    calls = []
    floor = gemm_floor.gemm_floor(
        hlo, with_torch=True, repeats=2, programs={"f": lambda: calls.append(1)}
    )
    assert floor["flops"] == 2 * 64 * 32 * 16 + 2 * 4 * 8 * 8 * 16
    assert floor["xla_s"] > 0 and floor["torch_s"] > 0
    assert len(calls) == 2 and set(floor["programs"]) == {"f"}  # timed once per round
    table = gemm_floor.floor_table(floor, "f")
    assert "| whole f, f |" in table and "| products alone, XLA |" in table


def test_markdown_holds_the_gemm_floor(run):
    _, markdown, _ = run
    assert "Matrix products of the JAX train step, each timed alone" in markdown
    assert "| products alone, XLA |" in markdown
    assert "| the same products alone, torch.einsum |" in markdown
