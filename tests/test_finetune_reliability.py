"""Reliability of experiments.finetune (issue 8): a fine-tuning run killed (SIGKILL, also inside
a checkpoint write) or stopped (SIGTERM) and restarted ends bit-identical to an uninterrupted
one; a finished run restarted does nothing; a restart with other settings is refused naming the
field. Also the stop requests outside the training loop of both entry points (start-up, and
pretraining's final export).

The fault-injection test runs fine-tuning as a subprocess (tests/finetune_fault_injection.py),
once, on the tiny model and synthetic SST-2 data of tests/test_finetune.py. The restarts share a
JAX compilation cache (in a temporary directory) with the uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import finetune
from funnel_jax import preemption
from funnel_jax.checkpoint import TrainCheckpointer, load_model_dir
from tests import test_reliability
from tests.test_finetune import make_pretrained_dir, write_sst2

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "finetune_fault_injection.py"

N_TRAIN, BATCH, EPOCHS, SAVE_EVERY = 64, 8, 4, 3
STEPS_PER_EPOCH = N_TRAIN // BATCH  # evaluations after every epoch (the default)
TOTAL = EPOCHS * STEPS_PER_EPOCH
STEP_LINE = re.compile(r"^step (\d+)/\d+: loss", re.MULTILINE)


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """main() re-executes the command with jemalloc: not inside pytest."""
    monkeypatch.setenv("FUNNEL_JAX_NO_JEMALLOC", "1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_reliability")
    pretrained = make_pretrained_dir(root / "pretrained")
    data = write_sst2(root / "sst2", n_train=N_TRAIN, n_dev=32)
    return pretrained, data, root / "xla_cache"


def _args(inputs, out_dir, *extra):
    pretrained, data, _ = inputs
    return [
        "--task",
        "sst2",
        "--data-dir",
        str(data),
        "--init",
        str(pretrained),
        "--output-dir",
        str(out_dir),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH),
        "--max-seq-length",
        "32",
        "--learning-rate",
        "1e-3",
        "--hidden-dropout",
        "0.1",  # dropout on: its RNG must be restored too
        "--seed",
        "5",
        "--save-every",
        str(SAVE_EVERY),
        "--log-every",
        "1",
        "--no-progress",
        *extra,
    ]


def _env(inputs, **extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="3",
        FUNNEL_JAX_NO_JEMALLOC="1",
        JAX_COMPILATION_CACHE_DIR=str(inputs[2]),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
        **extra,
    )
    return env


def _start(inputs, args, log: Path, **hook_env) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, str(HELPER), *args],
            cwd=ROOT,
            env=_env(inputs, **hook_env),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _last_step(log: Path) -> int:
    """The last training step the run writing `log` printed."""
    steps = STEP_LINE.findall(log.read_text(errors="replace")) if log.exists() else []
    return int(steps[-1]) if steps else 0


def _complete_steps(out: Path) -> list[int]:
    with TrainCheckpointer(out / "train_checkpoints") as ckpt:
        return ckpt.all_steps()


def _final_train_state(out: Path):
    with TrainCheckpointer(out / "train_checkpoints") as ckpt:
        return ckpt.restore(None)  # the newest, as stored


def _assert_same_leaves(a, b) -> None:
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The uninterrupted run (it also fills the compilation cache of the restarts)."""
    out = tmp_path_factory.mktemp("finetune_reference") / "full"
    ref = subprocess.run(
        [sys.executable, str(HELPER), *_args(inputs, out)],
        cwd=ROOT,
        env=_env(inputs),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    return out


def _snapshot(out: Path) -> dict:
    """Every path under `out` with, for files, the modification time and the contents."""
    return {
        p: (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None
        for p in sorted(out.rglob("*"))
    }


# --------------------------------------------------------------------------- fault injection


def test_sigkill_and_sigterm_resume_bit_identically(inputs, reference, tmp_path):
    split = tmp_path / "split"
    args = _args(inputs, split)
    rng = random.Random(8)
    slow = {"FUNNEL_TEST_STEP_SLEEP": "0.05"}  # the tiny steps take milliseconds

    # 1. SIGKILL at a random step after the second checkpoint.
    log1 = tmp_path / "run1.log"
    k1 = rng.randint(2 * SAVE_EVERY + 1, 3 * SAVE_EVERY + 1)
    proc = _start(inputs, args, log1, **slow)
    test_reliability.wait_for(proc, lambda: _last_step(log1) >= k1, log1)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    reached = _last_step(log1)
    done = _complete_steps(split)
    assert reached < TOTAL, log1.read_text()
    # Saves are async: the one of step 2 * SAVE_EVERY may still have been in flight (never
    # listed then); the one before it was complete, since a save starts after the last ends.
    assert done and SAVE_EVERY <= done[-1] <= reached and done[-1] % SAVE_EVERY == 0, done
    assert done[-1] >= (reached // SAVE_EVERY - 1) * SAVE_EVERY, (done, reached)

    # 2. SIGKILL in the middle of the write of a training checkpoint (the hook holds it open):
    # the first save from the next checkpoint step on that is no evaluation step (those save
    # the best parameters first).
    log2, marker = tmp_path / "run2.log", tmp_path / "in_save"
    target = next(
        s for s in range(done[-1] + 1, TOTAL) if s % SAVE_EVERY == 0 and s % STEPS_PER_EPOCH
    )
    hold = {
        "FUNNEL_TEST_SAVE_STEP": str(target),
        "FUNNEL_TEST_SAVE_MARKER": str(marker),
        "FUNNEL_TEST_SAVE_SLEEP": "60",
    }
    proc = _start(inputs, args, log2, **hold)
    test_reliability.wait_for(proc, marker.exists, log2)
    held = int(marker.read_text().split()[0])
    unfinished = list((split / "train_checkpoints").glob(f"{held}.orbax-checkpoint-tmp*"))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert f"resuming from step {done[-1]} " in log2.read_text(), log2.read_text()
    assert held == target and unfinished, "the kill did not land inside a checkpoint write"
    last_complete = _complete_steps(split)[-1]  # the held step is never listed
    assert last_complete == max(s for s in range(done[-1], target) if s % SAVE_EVERY == 0)

    # 3. SIGKILL while an async save is in flight (its commit held in the background thread):
    # the steps after it ran meanwhile (the overlap); it is never listed, and the restart
    # resumes from the complete one before it.
    log_async, marker_async = tmp_path / "run_async.log", tmp_path / "in_async_save"
    target = next(s for s in range(held + 1, TOTAL) if s % SAVE_EVERY == 0 and s % STEPS_PER_EPOCH)
    hold = {
        "FUNNEL_TEST_ASYNC_HOLD_STEP": str(target),
        "FUNNEL_TEST_SAVE_MARKER": str(marker_async),
        "FUNNEL_TEST_SAVE_SLEEP": "60",
    }
    proc = _start(inputs, args, log_async, **hold, **slow)
    test_reliability.wait_for(
        proc, lambda: marker_async.exists() and _last_step(log_async) > target, log_async
    )
    held = int(marker_async.read_text().split()[0])
    unfinished = list((split / "train_checkpoints").glob(f"{held}.orbax-checkpoint-tmp*"))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert f"resuming from step {last_complete} " in log_async.read_text()
    assert held == target and unfinished, "the kill did not land inside an async save"
    last_complete = _complete_steps(split)[-1]
    assert last_complete == max(s for s in range(0, target, SAVE_EVERY))

    # 4. SIGTERM at a random later step: a checkpoint of exactly the step reached, status 143.
    log3 = tmp_path / "run3.log"
    k3 = rng.randint(held + 1, TOTAL - 6)
    proc = _start(inputs, args, log3, **slow)
    test_reliability.wait_for(proc, lambda: _last_step(log3) >= k3, log3)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log3.read_text()
    text = log3.read_text()
    assert f"resuming from step {last_complete} " in text, text
    assert "SIGTERM received" in text
    saved = re.search(r"checkpoint of step (\d+) saved", text)
    assert saved, text
    stopped_at = int(saved.group(1))
    assert stopped_at == _last_step(log3) >= k3  # no step lost
    assert _complete_steps(split)[-1] == stopped_at
    assert not list((split / "train_checkpoints").glob("*.orbax-checkpoint-tmp*"))  # cleaned up
    assert not (split / "best_model").exists()

    # 5. The last restart finishes the run: bit-identical to the uninterrupted one.
    log4 = tmp_path / "run4.log"
    proc = _start(inputs, args, log4)
    assert proc.wait(timeout=300) == 0, log4.read_text()
    assert f"resuming from step {stopped_at} " in log4.read_text()
    state_ref, extra_ref = _final_train_state(reference)
    state, extra = _final_train_state(split)
    assert int(state_ref["step"]) == int(state["step"]) == TOTAL
    assert extra == extra_ref  # data position and best-metric bookkeeping
    _assert_same_leaves(state["params"], state_ref["params"])
    _assert_same_leaves(state, state_ref)  # optimizer state, RNG and step too
    _assert_same_leaves(
        load_model_dir(split / "best_model")[1], load_model_dir(reference / "best_model")[1]
    )
    for name in ("eval_results.json", "eval_history.jsonl", "predictions.tsv"):
        assert (split / name).read_bytes() == (reference / name).read_bytes(), name
    history = [json.loads(x) for x in (split / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(STEPS_PER_EPOCH, TOTAL + 1, STEPS_PER_EPOCH))
    # The best checkpoint directory holds the best step only; no leftovers anywhere.
    assert [p.name for p in (split / "checkpoints").iterdir()] == [str(extra["best"]["step"])]
    assert not [p for p in split.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- restarts


def test_a_finished_run_restarted_does_nothing(inputs, reference, capsys):
    before = _snapshot(reference)
    results = finetune.run(_args(inputs, reference))
    assert "this run has already finished; nothing to do" in capsys.readouterr().out
    assert results == json.loads((reference / "eval_results.json").read_text())
    assert _snapshot(reference) == before


def test_a_restart_with_other_settings_is_refused_naming_the_field(inputs, reference):
    _, data, _ = inputs
    before = _snapshot(reference)
    with pytest.raises(
        finetune.ConfigError, match=r"settings\.learning_rate: saved 0\.001, now 0\.002"
    ):
        finetune.run(_args(inputs, reference, "--learning-rate", "2e-3"))
    with pytest.raises(finetune.ConfigError, match=r"settings\.seed: saved 5, now 6"):
        finetune.run(_args(inputs, reference, "--seed", "6"))
    # Another task on the same files (the generic classification task reads them too).
    other_task = _args(inputs, reference, "--text-column", "sentence")
    other_task[other_task.index("sst2")] = "classification"
    with pytest.raises(finetune.ConfigError, match=r"task: saved 'sst2', now 'classification'"):
        finetune.run(other_task)
    assert finetune.main([*_args(inputs, reference, "--seed", "6")]) == 2
    assert _snapshot(reference) == before


# --------------------------------------------------------------------------- outside the loop


def _request_on_install(monkeypatch, signum=signal.SIGTERM) -> None:
    """A signal as soon as the handler is installed (i.e. during start-up)."""
    install = preemption.PreemptionHandler.install

    def install_and_request(self):
        install(self)
        self.request(signum)
        return self

    monkeypatch.setattr(preemption.PreemptionHandler, "install", install_and_request)


def test_finetune_stop_request_during_start_up(inputs, tmp_path, monkeypatch):
    _request_on_install(monkeypatch)
    out = tmp_path / "run"
    result = finetune.run(_args(inputs, out))
    assert result["signal"] == "SIGTERM" and preemption.exit_code_of(result) == 143
    assert not (out / "train_checkpoints").exists() and not (out / "best_model").exists()
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)  # handler removed


# The tiny settings, corpus and tokenizer of tests/test_reliability.py (its fixture, under this
# name here): the same compiled steps serve both files (funnel_jax.training.pretraining._build
# caches them).
pretrain_inputs = test_reliability.inputs


def _pretrain_args(inputs, out: Path) -> list[str]:
    return test_reliability._args(inputs, out, "--steps", "2", "--save-every", "1")


def test_pretrain_stop_request_during_start_up(pretrain_inputs, tmp_path, monkeypatch):
    from experiments import pretrain

    _request_on_install(monkeypatch)
    out = tmp_path / "run"
    result = pretrain.run(_pretrain_args(pretrain_inputs, out))
    assert result["signal"] == "SIGTERM" and preemption.exit_code_of(result) == 143
    assert result["stopped_at"] == 0
    assert not list((out / "checkpoints").glob("*")) and not (out / "final").exists()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary copies


def test_pretrain_signal_during_the_final_export_completes_it(
    pretrain_inputs,
    tmp_path,
    monkeypatch,
):
    from experiments import pretrain
    from funnel_jax import checkpoint

    out = tmp_path / "run"
    args = _pretrain_args(pretrain_inputs, out)
    save_model_dir = checkpoint.save_model_dir  # the final export

    def signal_then_save(*a, **k):
        # The real signal, through the handler (without one it would end the test process).
        assert callable(signal.getsignal(signal.SIGTERM)), "no SIGTERM handler during export"
        os.kill(os.getpid(), signal.SIGTERM)
        return save_model_dir(*a, **k)

    monkeypatch.setattr(checkpoint, "save_model_dir", signal_then_save)
    result = pretrain.run(args)
    assert result["signal"] == "SIGTERM" and preemption.exit_code_of(result) == 143
    assert (out / "summary.json").is_file() and (out / "loss_curves.png").is_file()
    assert (out / "final" / "config.json").is_file()
    monkeypatch.undo()
    assert pretrain.run(args)["already_finished"] is True


def test_non_finite_steps_are_skipped_then_stop_the_run_naming_them(inputs, tmp_path):
    """A learning rate of 1e30 makes every step after the first non-finite: the updates are
    skipped and counted, and the run stops with exit status 2 after --max-consecutive-skips in a
    row, naming the steps; the checkpoints saved before stay."""
    out = tmp_path / "nan_run"
    args = _args(inputs, out, "--max-consecutive-skips", "3")
    args[args.index("--learning-rate") + 1] = "1e30"
    args[args.index("--save-every") + 1] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.finetune", *args],
        cwd=ROOT,
        env=_env(inputs),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log
    match = re.search(r"steps (\d+)\.\.(\d+): 3 consecutive steps had a non-finite", log)
    assert match, log
    first, last = int(match[1]), int(match[2])
    assert last - first == 2 and first >= 2, log
    assert "--max-consecutive-skips=3" in log
    # the step before the last was logged with its running count; the last one stopped the run
    assert re.search(rf"step {last - 1}/\d+: loss (nan|inf), lr [^,]+, skipped 2", log), log
    saved = _complete_steps(out)  # --save-every 1: every step before the stop was saved
    assert saved and max(saved) == last - 1, (saved, log)
