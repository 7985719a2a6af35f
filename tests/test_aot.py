"""Deviceless AOT compile tool (funnel_jax/aot.py, experiments/aot_compile.py).

The GPU/TPU plugins are not installed in CI; what needs no plugin is tested here: target
parsing, the HLO-text statistics (against hand-written HLO with known counts), the accelerator
settings, and the whole compile path for `--target cpu` on 8 simulated devices (subprocess).
"""

# ruff: noqa: E501 (the hand-written HLO keeps XLA's long lines)
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from funnel_jax import aot, runtime

ROOT = Path(__file__).resolve().parent.parent

# A hand-written optimised-HLO module with known counts:
# kernels = 4 in the entry (2 fusions + cuBLAS + cuDNN custom calls) + 2 in the loop body
# (1 fusion, 1 Triton GEMM fusion) = 6; the nested fusion inside %fused_computation.1 and the
# reduction computation %add are not kernels. Collectives: all-gather-start (operand f32[2,8],
# result f32[8,8] = 256 bytes), all-reduce of a (bf16[4,4], f32[4]) tuple (32 + 16 = 48 bytes),
# reduce-scatter with operand bf16[16,4] (128 bytes) and result bf16[4,4], all-to-all
# f32[2,2] (16 bytes), and one TPU all-reduce-scatter fusion (an all-reduce of bf16[8,8] =
# 128 bytes whose result is sliced: a reduce-scatter).
HLO = """\
HloModule jit_step, entry_computation_layout={(f32[2,8]{1,0})->f32[8,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(f32[] %x, f32[] %y)
}

%fused_inner (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %neg = f32[8]{0} negate(f32[8]{0} %p)
}

%fused_computation.1 (param_0: f32[8,8]) -> f32[8,8] {
  %param_0 = f32[8,8]{1,0} parameter(0)
  %inner = f32[8]{0} fusion(f32[8]{0} %param_0), kind=kLoop, calls=%fused_inner
  ROOT %exp = f32[8,8]{1,0} exponential(f32[8,8]{1,0} %param_0)
}

%fused_computation.2 (param_0.1: f32[8,8]) -> f32[8] {
  %param_0.1 = f32[8,8]{1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[8]{0} reduce(f32[8,8]{1,0} %param_0.1, f32[] %c), dimensions={1}, to_apply=%add
}

%triton_gemm_computation (a: bf16[8,8], b: bf16[8,8]) -> bf16[8,8] {
  %a = bf16[8,8]{1,0} parameter(0)
  %b = bf16[8,8]{1,0} parameter(1)
  ROOT %d = bf16[8,8]{1,0} dot(bf16[8,8]{1,0} %a, bf16[8,8]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%all-reduce-scatter.1 (input: bf16[8,8]) -> bf16[2,8] {
  %input = bf16[8,8]{1,0} parameter(0)
  %all-reduce.9 = bf16[8,8]{1,0} all-reduce(%input), channel_id=9, replica_groups={{0,1,2,3}}, to_apply=%add
  %pid = u32[] partition-id()
  %zero = u32[] constant(0)
  ROOT %ds = bf16[2,8]{1,0} dynamic-slice(%all-reduce.9, %pid, %zero), dynamic_slice_sizes={2,8}
}

%body (state: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %state = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[8,8]{1,0}) %state), index=0
  %v = f32[8,8]{1,0} get-tuple-element((s32[], f32[8,8]{1,0}) %state), index=1
  %f3 = f32[8,8]{1,0} fusion(f32[8,8]{1,0} %v), kind=kLoop, calls=%fused_computation.1
  %bv = bf16[8,8]{1,0} convert(f32[8,8]{1,0} %f3)
  %g = bf16[8,8]{1,0} fusion(bf16[8,8]{1,0} %bv, bf16[8,8]{1,0} %bv), kind=kCustom, calls=%triton_gemm_computation, backend_config={"fusion_backend_config":{"kind":"__triton_gemm","triton_gemm_config":{"block_m":"16"}}}
  ROOT %t = (s32[], f32[8,8]{1,0}) tuple(s32[] %i, f32[8,8]{1,0} %f3)
}

%cond (state.1: (s32[], f32[8,8])) -> pred[] {
  %state.1 = (s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.42 (Arg_0: f32[2,8]) -> f32[8,8] {
  %Arg_0 = f32[2,8]{1,0} parameter(0)
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(f32[2,8]{1,0} %Arg_0), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %agd = f32[8,8]{1,0} all-gather-done((f32[2,8]{1,0}, f32[8,8]{1,0}) %ags)
  %f1 = f32[8,8]{1,0} fusion(f32[8,8]{1,0} %agd), kind=kLoop, calls=%fused_computation.1
  %f2 = f32[8]{0} fusion(f32[8,8]{1,0} %f1), kind=kInput, calls=%fused_computation.2
  %gemm = (bf16[8,8]{1,0}, s8[1024]{0}) custom-call(f32[8,8]{1,0} %f1, f32[8,8]{1,0} %f1), custom_call_target="__cublas$lt$matmul", backend_config={}
  %fmha = (bf16[1,2,8,4]{3,2,1,0}, u8[0]{0}) custom-call(f32[8,8]{1,0} %f1), custom_call_target="__cudnn$fmhaSoftmax"
  %gte = bf16[8,8]{1,0} get-tuple-element((bf16[8,8]{1,0}, s8[1024]{0}) %gemm), index=0
  %ar = (bf16[4,4]{1,0}, f32[4]{0}) all-reduce(bf16[4,4]{1,0} %x1, f32[4]{0} %x2), channel_id=2, replica_groups={{0,1}}, to_apply=%add
  %rs = bf16[4,4]{1,0} reduce-scatter(bf16[16,4]{1,0} %y), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %a2a = f32[2,2]{1,0} all-to-all(f32[2,2]{1,0} %z), channel_id=4, replica_groups={{0,1}}
  %ars = bf16[2,8]{1,0} fusion(bf16[8,8]{1,0} %gte), kind=kCustom, calls=%all-reduce-scatter.1
  %init = (s32[], f32[8,8]{1,0}) tuple(s32[] %c0, f32[8,8]{1,0} %f1)
  %w = (s32[], f32[8,8]{1,0}) while((s32[], f32[8,8]{1,0}) %init), condition=%cond, body=%body
  ROOT %out = f32[8,8]{1,0} get-tuple-element((s32[], f32[8,8]{1,0}) %w), index=1
}
"""


def test_hlo_stats_counts_known_module():
    s = aot.hlo_stats(HLO)
    assert (
        s["kernels"] == 7
    )  # 4 entry fusions/custom calls + the fused reduce-scatter + 2 in the loop
    assert s["fusions"] == 5
    assert s["fusion_kinds"] == {
        "kCustom": 1,
        "kCustom:__triton_gemm": 1,
        "kInput": 1,
        "kLoop": 2,
    }
    assert s["custom_calls"] == {"__cublas$lt$matmul": 1, "__cudnn$fmhaSoftmax": 1}
    assert (s["cublas_gemms"], s["cudnn_calls"], s["triton_gemms"]) == (1, 1, 1)
    assert s["while_loops"] == 1
    assert s["collectives"] == {
        "all-gather": {"count": 1, "bytes": 256},
        "all-reduce": {"count": 1, "bytes": 48},
        "all-to-all": {"count": 1, "bytes": 16},
        "reduce-scatter": {"count": 2, "bytes": 128 + 128},
    }


# TPU cost-model cycles: entry fusion 100 + outer loop (known_trip_count 3) x (its fusion 10 +
# inner loop (i < 4, from the condition) x fusion 1) = 100 + 3 x (10 + 4) = 142; the nested
# fusion's 1000 inside a fused computation is part of its caller's estimate, not added.
CYCLES_HLO = """\
HloModule jit_step

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %nested = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, calls=%fused_inner, backend_config={"window_config":{"estimated_cycles":"1000"}}
  ROOT %n = f32[8]{0} negate(f32[8]{0} %nested)
}

%fused_inner (q: f32[8]) -> f32[8] {
  %q = f32[8]{0} parameter(0)
  ROOT %e = f32[8]{0} exponential(f32[8]{0} %q)
}

%inner_body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %v = f32[8]{0} get-tuple-element(%s), index=1
  %f = f32[8]{0} fusion(f32[8]{0} %v), kind=kLoop, calls=%fused, backend_config={"flag_configs":[],"window_config":{"estimated_cycles":"1"}}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i0, %f)
}

%inner_cond (s.1: (s32[], f32[8])) -> pred[] {
  %s.1 = (s32[], f32[8]{0}) parameter(0)
  %c4 = s32[]{:T(128)} constant(4)
  %i = s32[]{:T(128)} get-tuple-element(%s.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %c4), direction=LT
}

%outer_body (s.2: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s.2 = (s32[], f32[8]{0}) parameter(0)
  %v.2 = f32[8]{0} get-tuple-element(%s.2), index=1
  %g = f32[8]{0} fusion(f32[8]{0} %v.2), kind=kLoop, calls=%fused, backend_config={"window_config":{"estimated_cycles":"10"}}
  %w.in = (s32[], f32[8]{0}) while(%s.2), condition=%inner_cond, body=%inner_body
  ROOT %t.2 = (s32[], f32[8]{0}) tuple(%i0, %g)
}

%outer_cond (s.3: (s32[], f32[8])) -> pred[] {
  %s.3 = (s32[], f32[8]{0}) parameter(0)
  ROOT %b = pred[] constant(true)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %h = f32[8]{0} fusion(f32[8]{0} %a), kind=kLoop, calls=%fused, backend_config={"window_config":{"estimated_cycles":"100"}}
  %init = (s32[], f32[8]{0}) tuple(%c0, %h)
  %w = (s32[], f32[8]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_hlo_stats_weighs_the_cost_model_cycles_by_trip_counts():
    s = aot.hlo_stats(CYCLES_HLO)
    assert s["estimated_cycles"] == 100 + 3 * (10 + 4 * 1)
    assert s["loops_without_trip_count"] == 0
    plain = aot.hlo_stats(HLO)  # no cost model written; its loop condition is a constant
    assert (plain["estimated_cycles"], plain["loops_without_trip_count"]) == (0, 1)
    # a condition that is not `i < constant` gives no trip count: the body counts once
    unknown = CYCLES_HLO.replace("direction=LT", "direction=NE")
    assert aot.hlo_stats(unknown)["estimated_cycles"] == 100 + 3 * (10 + 1)
    assert aot.hlo_stats(unknown)["loops_without_trip_count"] == 1


def test_array_bytes_and_tuples():
    assert aot.array_bytes("bf16[16,512,1024]{2,1,0}") == 16 * 512 * 1024 * 2
    assert aot.array_bytes("(f32[2,3]{1,0}, pred[7]{0}, s32[])") == 24 + 7 + 4
    assert aot.array_bytes("f32[8]{0:T(256)}") == 32  # TPU tiled layouts
    assert aot._tuple_elements("((f32[2], f32[3]), (f32[4], f32[6]))") == [
        "(f32[2], f32[3])",
        "(f32[4], f32[6])",
    ]


def test_parse_target():
    assert aot.parse_target("cpu") == aot.Target("cpu", "cpu")
    h200 = aot.parse_target("h200")
    assert (h200.kind, h200.topology, h200.platform) == ("gpu", "1x1x1", "cuda")
    assert h200.target_config == ROOT / "configs" / "targets" / "h200.txtpb"
    assert aot.parse_target("H100:1x1x8").topology == "1x1x8"
    tpu = aot.parse_target("tpu:v5p:4x4x4")
    assert (tpu.kind, tpu.topology, tpu.platform) == ("tpu", "v5p:4x4x4", "tpu")
    with pytest.raises(ValueError, match="unknown target"):
        aot.parse_target("a100")
    with pytest.raises(ValueError, match="GPU topology"):
        aot.parse_target("h200:8")
    with pytest.raises(ValueError, match="tpu:<generation>:<topology>"):
        aot.parse_target("tpu:4x4")
    with pytest.raises(ValueError, match="does not exist"):
        aot.parse_target("h200", target_config="/nonexistent.txtpb")


def test_gpu_target_configs_are_hopper():
    for name, memory in (("h200", 151397597184), ("h100", 85899345920)):
        text = (ROOT / "configs" / "targets" / f"{name}.txtpb").read_text()
        assert "core_count: 132" in text and "major: 9" in text
        assert f"device_memory_size: {memory}" in text


def test_compiler_options_and_accelerator_settings(monkeypatch):
    assert aot.parse_compiler_options(["a=false", "b=12", "c=x"]) == {"a": False, "b": 12, "c": "x"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        aot.parse_compiler_options(["novalue"])
    assert runtime.accelerator_settings("cpu") == {"jax": {}, "compiler_options": {}}
    gpu = runtime.accelerator_settings("gpu")
    assert gpu["compiler_options"]["xla_gpu_enable_triton_gemm"] is False
    assert gpu["compiler_options"]["xla_disable_hlo_passes"] == "triton-softmax-rewriter"
    assert gpu["jax"]["jax_threefry_gpu_kernel_lowering"] is True
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setattr(runtime, "GPU_JAX_SETTINGS", {})  # leave this process's jax.config alone
    runtime.apply_accelerator_settings("cuda")
    assert os.environ["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false "
        "--xla_disable_hlo_passes=triton-softmax-rewriter"
    )
    runtime.apply_accelerator_settings("cuda")  # idempotent
    assert os.environ["XLA_FLAGS"].count("triton_gemm") == 1
    assert os.environ["XLA_FLAGS"].count("xla_disable_hlo_passes") == 1


def test_compile_check_settings_lower_the_optimization_level():
    settings = runtime.COMPILE_CHECK_JAX_SETTINGS
    assert settings == {"jax_optimization_level": "O0"}
    before = jax.config.jax_optimization_level
    try:
        aot.apply_jax_settings(settings)  # names and values jax.config accepts
        assert str(jax.config.jax_optimization_level) == "O0"
    finally:
        jax.config.update("jax_optimization_level", before)


def test_gpu_compiler_options_are_valid_xla_options():
    """Each GPU compile option is a DebugOptions field XLA parses from its value as written
    (checked on this host's CPU compiler, which reads the same options; a misspelt name or a
    malformed value fails the compile)."""
    fn = jax.jit(lambda x: jax.nn.softmax(x * 2.0, axis=-1))
    lowered = fn.lower(jax.ShapeDtypeStruct((4, 8), jnp.float32))
    options = dict(runtime.GPU_COMPILER_OPTIONS)
    compiled = lowered.compile(compiler_options=options)
    assert compiled.as_text()
    with pytest.raises(Exception, match="xla_no_such_option"):
        lowered.compile(compiler_options={"xla_no_such_option": True})


_TINY = [
    "--config", "small",
    "--set", "block_sizes=[1,1,1]", "d_model=32", "n_head=4", "d_head=8", "d_inner=64",
    "vocab_size=256", "num_decoder_layers=1",
    "--pretrain-preset", "tiny",
    "--seq-len", "16", "--batch-size", "8", "--dtype", "float32",
]  # fmt: skip


@pytest.fixture(scope="module")
def cpu_compile(tmp_path_factory):
    """The CLI on 8 simulated CPU devices (mesh fsdp=4 x tensor=2): forward and ELECTRA step."""
    out = tmp_path_factory.mktemp("aot")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "experiments.aot_compile", "--target", "cpu", *_TINY,
           "--mesh", "fsdp=4,tensor=2", "--forward", "--json", str(out / "r.json"),
           "--hlo-dir", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, json.loads((out / "r.json").read_text()), out


def test_cpu_compile_prints_and_writes(cpu_compile):
    stdout, result, out = cpu_compile
    assert "[forward]" in stdout and "[train_step]" in stdout and "memory per device" in stdout
    assert result["meta"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    progs = {p["program"]: p for p in result["programs"]}
    assert set(progs) == {"forward", "train_step"}
    step = progs["train_step"]
    assert step["compile_s"] > 0 and step["compile_cpu_s"] > 0
    assert step["hlo"]["kernels"] > progs["forward"]["hlo"]["kernels"]
    # parameters and optimizer state (3 copies, float32) are the arguments, donated to the outputs
    assert step["memory"]["arguments"] > 0 and step["memory"]["aliased"] > 0
    assert step["model_flops"] > 3 * progs["forward"]["model_flops"]  # + the generator
    assert (out / "train_step.hlo.txt").read_text().startswith("HloModule")


def test_cpu_compile_collectives(cpu_compile):
    """FSDP gathers parameters; tensor parallelism and the batch split all-reduce partial sums."""
    _, result, _ = cpu_compile
    progs = {p["program"]: p for p in result["programs"]}
    for name in ("forward", "train_step"):
        kinds = progs[name]["hlo"]["collectives"]
        assert kinds.get("all-gather", {}).get("count", 0) > 0, (name, kinds)
        assert kinds.get("all-reduce", {}).get("count", 0) > 0, (name, kinds)


def test_cpu_compile_all_to_alls_only_move_the_embedding_lookup(cpu_compile):
    """No all-to-all comes from the model's own layout: the position encodings are replicated
    (split along D by the partitioner, each concatenation of their sin / cos halves was an
    all-to-all: 12 of the step's 15). What is left reshards the table lookup, which gathers
    rows split along D, to the batch split (forward and backward)."""
    _, _, out = cpu_compile
    hlo = (out / "train_step.hlo.txt").read_text()
    ops = re.findall(r" all-to-all\(.*op_name=\"([^\"]*)\"", hlo)
    assert ops, "no all-to-all found: the embedding lookup's reshard is expected"
    assert not [o for o in ops if "position_encoder" in o], ops
    assert all("embeddings" in o.lower() for o in ops), ops


def test_gpu_check_script_uses_the_gpu_settings():
    """benchmarks/gpu_check.sh sets XLA_FLAGS / JAX_* itself (it runs before the package is
    installed on the GPU host): every accelerator setting must be in it, as it is written."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    for name, value in runtime.GPU_COMPILER_OPTIONS.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"--{name}={text}" in script, name
    for name, value in runtime.GPU_JAX_SETTINGS.items():
        assert f"{name.upper()}={int(value) if isinstance(value, bool) else value}" in script, name


def test_make_mesh_splits_physical_axes_when_the_torus_does_not_factor(monkeypatch):
    """jax.make_mesh refuses data=8,fsdp=8 on a 4x4x4 v5p-64 torus (NotImplementedError, seen
    with the TPU topology); sharding.make_mesh then builds the mesh with split physical axes.
    Here the refusal is simulated on the host's devices."""
    from funnel_jax import sharding

    def refuse(*args, **kwargs):
        raise NotImplementedError("Failed to find assignment for logical_axis_index 1")

    monkeypatch.setattr(jax, "make_mesh", refuse)
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh("data=1,fsdp=1", devices=devices)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    assert list(mesh.devices.flat) == devices
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
