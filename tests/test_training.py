"""funnel_jax.training: the --set parser, the restart check, the presets as package data, the
mesh in force when the step is lowered, and async checkpoints (overlap, SIGKILL mid-save)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from funnel_jax.training import (
    ConfigError,
    PretrainConfig,
    apply_overrides,
    config_diff,
    restart_may_change,
)

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "fault_injection.py"


# --------------------------------------------------------------------------- settings


def test_overrides_parse_json_or_string_and_name_bad_items():
    cfg = apply_overrides(
        {"optimizer": {"learning_rate": 1e-3}},
        ["optimizer.learning_rate=5e-4", "model.block_sizes=[1,1]", "train.dtype=bfloat16"],
        sections=("model", "optimizer", "train"),
    )
    assert cfg == {
        "optimizer": {"learning_rate": 5e-4},
        "model": {"block_sizes": [1, 1]},
        "train": {"dtype": "bfloat16"},
    }
    with pytest.raises(ConfigError, match=r"unknown section 'bogus'"):
        apply_overrides({}, ["bogus.x=1"], sections=("model",))
    with pytest.raises(ConfigError, match=r"SECTION\.KEY=VALUE, got 'model'"):
        apply_overrides({}, ["model"], sections=("model",))


def test_restart_check_uses_the_field_metadata():
    may = restart_may_change(PretrainConfig)
    assert {"train.log_every", "train.save_every", "train.async_checkpointing", "mesh"} <= may
    assert "train.steps" not in may and "data.seq_len" not in may
    base = PretrainConfig().to_dict()
    changed = PretrainConfig.from_dict(
        {**base, "train": {**base["train"], "steps": 7, "log_every": 1}}
    ).to_dict()
    assert config_diff(base, changed, may) == ["train.steps: saved 300, now 7"]


def test_presets_ship_in_the_wheel_and_are_found_from_another_directory(tmp_path):
    """A regular (non-editable) build carries configs/*; importlib.resources finds them."""
    import shutil

    src, wheel_dir = tmp_path / "src", tmp_path / "wheel"  # a copy: the build writes build/
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("funnel_jax", "convert", "experiments", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = wheel_dir.glob("funnel_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    targets = [f"configs/targets/{p.name}" for p in (ROOT / "configs/targets").glob("*.txtpb")]
    assert targets, "no configs/targets/*.txtpb in the source tree"
    for name in ("configs/pretrain/tiny.json", "configs/finetune/sst2.json",
                 "configs/models/small.json", "configs/__init__.py", *targets):  # fmt: skip
        assert name in names, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from funnel_jax.training import presets; "
        "print(presets.preset_path('pretrain', 'tiny')); print(presets.preset_names('models'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "PYTHONPATH": str(site)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    path, models = out.stdout.splitlines()[-2:]
    assert Path(path) == site / "configs" / "pretrain" / "tiny.json"
    assert "small" in models


def test_accelerator_settings_are_a_no_op_on_cpu(monkeypatch):
    """The commands call runtime.apply_accelerator_settings() before jax starts; on CPU it
    finds the platform without starting a backend and changes no setting, flag or result."""
    import jax.numpy as jnp

    from funnel_jax import runtime

    monkeypatch.delenv("FUNNEL_JAX_NO_ACCEL_SETTINGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert runtime.platform_before_start() == "cpu"
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
    before = (np.asarray(jax.jit(lambda a: jnp.tanh(a @ a.T))(x)), jax.config.values.copy())
    assert runtime.apply_accelerator_settings() == {"jax": {}, "compiler_options": {}}
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    after = np.asarray(jax.jit(lambda a: jnp.tanh(a @ a.T))(x))  # traced and compiled anew
    assert jax.config.values == before[1]
    np.testing.assert_array_equal(after, before[0])
    # The GPU settings are found for a CUDA machine (without starting its backend).
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert runtime.platform_before_start() == "cuda"


def test_logged_learning_rate_is_the_optimizers_own_after_a_skipped_step():
    """Step 2 is non-finite (skipped): the schedule's count does not advance, so step 3 runs
    (and logs) the rate step 2 would have had; counting from state.step would log 0.5."""
    import jax.numpy as jnp

    from funnel_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from funnel_jax.train_state import TrainState, make_train_step

    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, total_steps=10)
    tx = make_optimizer(cfg)

    def loss(p, b, rng):
        return jnp.sum(p["w"] * b["x"]), {}

    step = jax.jit(make_train_step(loss, tx, learning_rate_fn=learning_rate_schedule(cfg)))
    state = TrainState.create({"w": jnp.ones(3)}, tx, 0)
    logged = []
    for x in (1.0, np.nan, 1.0, 1.0):
        state, m = step(state, {"x": jnp.full(3, x)})
        logged.append((float(m["learning_rate"]), int(m["skipped"])))
    assert logged == [(0.0, 0), (0.25, 1), (0.25, 0), (0.5, 0)]


def test_micro_batches_take_rows_from_every_batch_shard():
    """Gradient accumulation over k=2 micro-batches of a batch of 16 rows split in 4 shards of
    4 contiguous rows (data x fsdp): each micro-batch holds 2 rows of every shard."""
    from funnel_jax.train_state import _split_micro_batches

    micro = np.asarray(_split_micro_batches({"x": np.arange(16)}, 2)["x"])
    assert micro.shape == (2, 8)
    assert sorted(micro.ravel().tolist()) == list(range(16))  # every row once
    for rows in micro:
        assert sorted(np.bincount(rows // 4, minlength=4).tolist()) == [2, 2, 2, 2], micro


# --------------------------------------------------------------------------- mesh


def test_lowered_pretraining_step_holds_the_model_sharding_constraints():
    """Run in a subprocess with 8 devices: the step as pretrain() lowers it on data=2,fsdp=2,
    tensor=2 constrains the blocks' [batch, length, embed] outputs over data x fsdp; the same
    step traced outside the rules (the old bug) has no constraint at all."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.training_lowering_check"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    assert r["stopped_at"] == 1
    activation = '<@mesh, [{"data", "fsdp"}, {}, {}]>'
    assert r["mesh_constraints"].count(activation) >= 4, r["mesh_constraints"]
    assert r["broken_constraints"] == [], r["broken_constraints"]


# --------------------------------------------------------------------------- async saves


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from funnel_jax import data as data_lib
    from funnel_jax.tokenizer import FunnelTokenizer

    root = tmp_path_factory.mktemp("training_inputs")
    docs = data_lib.stdlib_corpus()[:80]
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    FunnelTokenizer.train(iter(docs), vocab_size=400).save_pretrained(root / "tok")
    return corpus, root / "tok"


def _args(inputs, out, *extra):
    corpus, tok = inputs
    return [
        "--config", "tiny", "--corpus", str(corpus), "--tokenizer", str(tok),
        "--output-dir", str(out), "--seq-len", "32", "--batch-size", "8", "--seed", "3",
        "--no-progress", "--compile-cache", os.environ["FUNNEL_JAX_COMPILE_CACHE"],
        "--set", "model.block_sizes=[1,1]", "model.num_decoder_layers=1", "model.d_model=32",
        "model.n_head=4", "model.d_head=8", "model.d_inner=64", "model.hidden_dropout=0.1",
        "data.eval_fraction=0.1", "data.eval_batches=1", "train.log_every=1",
        "optimizer.warmup_steps=3", "optimizer.total_steps=30", *extra,
    ]  # fmt: skip


def _held_save(monkeypatch, pause: float) -> list[tuple[float, float]]:
    """Every `extra` write of a training checkpoint takes `pause` more seconds, inside Orbax's
    commit (the background thread of an async save, the caller's thread of a sync one)."""
    import orbax.checkpoint as ocp

    windows = []
    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def slow_save_fn(self, x, directory):
        t0 = time.time()
        time.sleep(pause)
        windows.append((t0, time.time()))
        return await save_fn(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", slow_save_fn)
    return windows


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_async_save_overlaps_the_next_steps(inputs, tmp_path, monkeypatch, mode):
    """Async: train steps are logged while the save of step 4 is being written. Sync (the
    control, which the check must tell apart): no step is logged during a write."""
    from experiments import pretrain

    windows = _held_save(monkeypatch, pause=2.0)
    out = tmp_path / mode
    flag = "true" if mode == "async" else "false"
    summary = pretrain.run(
        _args(inputs, out, "--steps", "10", "--save-every", "4",
              "--set", f"train.async_checkpointing={flag}")
    )  # fmt: skip
    assert summary["steps"] == 10
    rows = [r for r in pretrain.read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    (t0, t1), *_ = windows  # the write of step 4 (the run's first save)
    during = [r["step"] for r in rows if t0 < r["time"] < t1]
    if mode == "async":
        assert during and min(during) > 4, (during, windows)
    else:
        assert during == [], (during, windows)
    from funnel_jax.checkpoint import TrainCheckpointer

    assert TrainCheckpointer(out / "checkpoints").all_steps() == [4, 8, 10]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), FUNNEL_JAX_NO_JEMALLOC="1", **extra)
    return env


def _last_step(out: Path) -> int:
    from experiments import pretrain

    rows = pretrain.read_metrics(out / "metrics.jsonl")
    return max((r["step"] for r in rows if r.get("split") == "train"), default=0)


def test_sigkill_during_an_async_save_resumes_bit_identically(inputs, tmp_path):
    from experiments import pretrain
    from funnel_jax.checkpoint import TrainCheckpointer

    steps = ["--steps", "16", "--save-every", "4"]
    full, split = tmp_path / "full", tmp_path / "split"
    ref = subprocess.run(
        [sys.executable, str(HELPER), *_args(inputs, full, *steps)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stdout + ref.stderr
    marker, log = tmp_path / "held", tmp_path / "log.txt"
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), *_args(inputs, split, *steps)],
            cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
            env=_env(FUNNEL_TEST_ASYNC_HOLD_STEP="8", FUNNEL_TEST_SAVE_MARKER=str(marker),
                     FUNNEL_TEST_SAVE_SLEEP="120"),
        )  # fmt: skip
    t0 = time.time()
    # The save of step 8 is held in flight; the steps after it still run (the overlap).
    while not (marker.exists() and _last_step(split) >= 10):
        assert proc.poll() is None, log.read_text()
        assert time.time() - t0 < 400, log.read_text()
        time.sleep(0.05)
    held = int(marker.read_text().split()[0])
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert held == 8
    assert list((split / "checkpoints").glob("8.orbax-checkpoint-tmp*")), "not killed mid-save"
    with TrainCheckpointer(split / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4]  # the unfinished step 8 is never listed
    rerun = subprocess.run(
        [sys.executable, str(HELPER), *_args(inputs, split, *steps)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert json.loads((split / "summary.json").read_text())["resumed_from"] == 4
    a, extra_a = pretrain.restore_state(full)
    b, extra_b = pretrain.restore_state(split)
    assert int(a.step) == int(b.step) == 16 and extra_a["data"] == extra_b["data"]
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
