"""Reliability of experiments.pretrain (issue 8): preemption, kills, determinism under
restarts, the non-finite guard, and input validation before training (docs/reliability.md).

The fault-injection test runs pretraining as a subprocess (tests/fault_injection.py) and kills
it at moments drawn with a fixed seed, one of them inside a checkpoint write; the restarted
run must end bit-identical to an uninterrupted one. The other tests run in-process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import pretrain
from funnel_jax import data, preemption, validation
from funnel_jax.checkpoint import CheckpointMismatchError, TrainCheckpointer

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "fault_injection.py"
COMPILE_CACHE = os.environ.get("FUNNEL_JAX_COMPILE_CACHE", "~/.cache/funnel_jax/xla")

TINY = [
    "--config",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "8",
    "--seed",
    "3",
    "--no-progress",
    "--compile-cache",
    COMPILE_CACHE,
    "--set",
    "model.block_sizes=[1,1]",
    "model.num_decoder_layers=1",
    "model.d_model=32",
    "model.n_head=4",
    "model.d_head=8",
    "model.d_inner=64",
    "model.hidden_dropout=0.1",  # dropout on: its RNG must be restored too
    "data.eval_fraction=0.1",
    "data.eval_batches=1",
    "train.log_every=1",
    "optimizer.warmup_steps=3",
    "optimizer.total_steps=30",  # one schedule for every run here: one compilation
    "train.keep_checkpoints=2",
]


@pytest.fixture(autouse=True)
def _no_reexec(monkeypatch):
    """pretrain.main() re-executes the command with jemalloc: not inside pytest."""
    monkeypatch.setenv("FUNNEL_JAX_NO_JEMALLOC", "1")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A small synthetic corpus and one tokenizer trained on it, shared by every run (training
    a vocabulary is not bit-reproducible)."""
    from funnel_jax.tokenizer import FunnelTokenizer

    root = tmp_path_factory.mktemp("reliability_inputs")
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "pi", "da", "en", "or", "is"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(600)})
    docs = []
    for _ in range(300):
        sentences = [
            " ".join(rng.choice(words, size=int(rng.integers(4, 14)))).capitalize() + "."
            for _ in range(int(rng.integers(2, 7)))
        ]
        docs.append(" ".join(sentences))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    tok = FunnelTokenizer.train(iter(docs), vocab_size=500)
    tok_dir = root / "tokenizer"
    tok.save_pretrained(tok_dir)
    return corpus, tok_dir


def _args(inputs, out_dir, *extra, corpus=None):
    corpus_path, tok_dir = inputs
    return [
        *TINY,
        "--corpus",
        str(corpus or corpus_path),
        "--tokenizer",
        str(tok_dir),
        "--output-dir",
        str(out_dir),
        *extra,
    ]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3", **extra)
    return env


def _start(args, log: Path, **hook_env) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, str(HELPER), *args],
            cwd=ROOT,
            env=_env(**hook_env),
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _last_step(out: Path, since: float = 0.0) -> int:
    """The last train step logged by a run started at time `since` (a restart first drops the
    rows after its checkpoint: until it has rewritten the file, the rows are an older run's)."""
    path = out / "metrics.jsonl"
    if not path.exists() or path.stat().st_mtime < since:
        return 0
    rows = pretrain.read_metrics(path)
    return max((r["step"] for r in rows if r.get("split") == "train"), default=0)


def wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (rc {proc.returncode}):\n{log.read_text()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting:\n{log.read_text()}")
        time.sleep(0.01)


def _complete_steps(out: Path) -> list[int]:
    with TrainCheckpointer(out / "checkpoints") as ckpt:
        return ckpt.all_steps()


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    a, extra_a = pretrain.restore_state(a_dir)
    b, extra_b = pretrain.restore_state(b_dir)
    assert int(a.step) == int(b.step)
    assert extra_a["data"] == extra_b["data"]
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


# --------------------------------------------------------------------------- fault injection


def test_sigkill_and_sigterm_at_random_moments_resume_bit_identically(inputs, tmp_path):
    steps = ["--steps", "30", "--save-every", "5"]
    full, split = tmp_path / "full", tmp_path / "split"
    log = tmp_path / "log.txt"
    rng = random.Random(8)

    # The uninterrupted reference (also fills the compile cache for the restarts).
    ref = subprocess.run(
        [sys.executable, str(HELPER), *_args(inputs, full, *steps)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    args = _args(inputs, split, *steps)

    # 0. SIGKILL while --corpus is being prepared into split/data (the hook holds the packing).
    marker0 = tmp_path / "in_prepare"
    proc = _start(args, log, FUNNEL_TEST_PREPARE_MARKER=str(marker0), FUNNEL_TEST_SAVE_SLEEP="60")
    wait_for(proc, marker0.exists, log)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert (split / ".data.partial").is_dir() and not (split / "data").exists()
    assert not (split / "checkpoints").is_dir() or not _complete_steps(split)

    # 1. SIGKILL at a random step after the first checkpoint (step 5) is complete (saves are
    # async: the steps after 5 run while it is written; Orbax renames it to "5" when complete).
    k1 = rng.randint(6, 9)
    proc, t0 = _start(args, log), time.time()
    wait_for(proc, lambda: _last_step(split, t0) >= k1 and (split / "checkpoints/5").is_dir(), log)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    before = _complete_steps(split)
    assert before and before[0] == 5, before  # fast steps may have saved step 10 before the kill

    # 2. SIGKILL in the middle of a checkpoint write (the hook holds it open).
    marker = tmp_path / "in_save"
    proc = _start(
        args,
        log,
        FUNNEL_TEST_SAVE_STEP=str(before[-1] + 1),
        FUNNEL_TEST_SAVE_MARKER=str(marker),
        FUNNEL_TEST_SAVE_SLEEP="60",
    )
    wait_for(proc, marker.exists, log)
    held = int(marker.read_text().split()[0])
    unfinished = list((split / "checkpoints").glob(f"{held}.orbax-checkpoint-tmp*"))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    assert unfinished, "the kill did not land inside a checkpoint write"
    assert held not in _complete_steps(split)  # the incomplete step is never listed

    # 3. SIGKILL at another random step (the restart resumes before `held`).
    k3 = rng.randint(held + 1, 21)
    proc, t0 = _start(args, log), time.time()
    wait_for(proc, lambda: _last_step(split, t0) >= k3, log)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    # Kill 2's leftover was cleaned up: an unfinished step directory can only be the save that
    # was in flight at this kill, newer than every complete step.
    in_flight = [
        int(p.name.split(".")[0]) for p in (split / "checkpoints").glob("*.orbax-checkpoint-tmp*")
    ]
    complete = _complete_steps(split)
    assert all(step > complete[-1] for step in in_flight), (in_flight, complete)

    # 4. SIGTERM: a checkpoint at the exact step reached, exit status 128 + 15.
    k4 = rng.randint(k3 + 1, 28)
    proc, t0 = _start(args, log), time.time()
    wait_for(proc, lambda: _last_step(split, t0) >= k4, log)
    time.sleep(rng.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()
    reached = _last_step(split)
    assert reached >= k4
    assert _complete_steps(split)[-1] == reached  # no step lost
    assert "SIGTERM received" in log.read_text()
    assert not (split / "final").exists()

    # 5. The last restart finishes the run.
    proc = _start(args, log)
    assert proc.wait(timeout=300) == 0, log.read_text()
    _assert_same_state(full, split)
    summary = json.loads((split / "summary.json").read_text())
    assert summary["resumed_from"] == reached
    rows = [r for r in pretrain.read_metrics(split / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, 31))  # every step logged exactly once

    # 6. A finished run is left as it is.
    watched = [split / "summary.json", split / "metrics.jsonl", split / "final" / "config.json"]
    stamp = [(p.stat().st_mtime_ns, p.read_bytes()) for p in watched]
    again = pretrain.run(args)
    assert again["already_finished"] is True
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in watched] == stamp


# --------------------------------------------------------------------------- in-process runs


@pytest.fixture(scope="module")
def finished_run(inputs, tmp_path_factory):
    """A 4-step run (checkpoints 2 and 4), finished."""
    out = tmp_path_factory.mktemp("finished") / "run"
    summary = pretrain.run(_args(inputs, out, "--steps", "4", "--save-every", "2"))
    assert summary["steps"] == 4
    return out


def test_a_kill_during_the_final_export_is_finished_on_restart(inputs, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    # As if killed inside save_model_dir after renaming the old final/ away, and before
    # summary.json: a half-written temporary copy and the renamed old one are left.
    (out / "summary.json").unlink()
    os.rename(out / "final", out / ".final.old-1234abcd")
    (out / ".final.tmp-xyz").mkdir()
    (out / ".final.tmp-xyz" / "config.json").write_text("{")
    (out / "summary.json.tmp").write_text("{")
    summary = pretrain.run(_args(inputs, out, "--steps", "4", "--save-every", "2"))
    assert summary["resumed_from"] == 4 and (out / "summary.json").is_file()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert not (out / "summary.json.tmp").exists()
    from funnel_jax.checkpoint import load_model_dir

    _, exported = load_model_dir(out / "final")
    _, original = load_model_dir(finished_run / "final")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(original), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_in_process_stop_request_saves_the_current_step(inputs, tmp_path, monkeypatch):
    """A stop request (what the SIGTERM/SIGINT handler sets) between save points."""
    out = tmp_path / "run"
    install = preemption.PreemptionHandler.install

    def install_and_request_at_step_3(self):
        install(self)
        should_stop = self.should_stop
        self.should_stop = lambda step: (
            (step == 3 and self.request(signal.SIGINT)) or (should_stop(step))
        )
        return self

    monkeypatch.setattr(preemption.PreemptionHandler, "install", install_and_request_at_step_3)
    result = pretrain.run(_args(inputs, out, "--steps", "4", "--save-every", "100"))
    assert result["stopped_at"] == 3 and result["signal"] == "SIGINT"
    assert preemption.exit_code_of(result) == 130
    assert _complete_steps(out) == [3]
    # The handlers are gone once run() returns.
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None)


def test_consecutive_non_finite_steps_stop_the_run(inputs, tmp_path, monkeypatch):
    """Steps >= 4 get a NaN loss: they are skipped and counted; the third in a row (step 6)
    stops the run, detected at the next metrics fetch (step 10), without a new checkpoint."""
    import funnel_jax.train_state as ts

    make_train_step = ts.make_train_step

    def poisoned_make_train_step(loss_fn, tx, **kw):
        def poisoned_loss(params, batch, rng):
            batch = dict(batch)
            scale = batch.pop("poison")
            loss, metrics = loss_fn(params, batch, rng)
            return loss * scale, metrics

        return make_train_step(poisoned_loss, tx, **kw)

    from funnel_jax.training import pretraining as pretrain_lib

    build = pretrain_lib._build.__wrapped__  # not the cached one: a fresh, poisoned step

    def poisoned_build(*a):
        out = list(build(*a))
        train_step = out[2]

        def step_with_poison(state, batch):
            poison = np.float32(np.nan if int(state.step) + 1 >= 4 else 1.0)
            return train_step(state, {**batch, "poison": poison})

        out[2] = step_with_poison
        return tuple(out)

    monkeypatch.setattr(ts, "make_train_step", poisoned_make_train_step)
    monkeypatch.setattr(pretrain_lib, "_build", poisoned_build)
    out = tmp_path / "run"
    args = _args(
        inputs,
        out,
        "--steps",
        "20",
        "--save-every",
        "5",
        "--set",
        "train.log_every=5",
        "train.max_consecutive_skips=3",
    )
    with pytest.raises(validation.TooManySkippedSteps) as info:
        pretrain.run(args)
    msg = str(info.value)
    assert "steps 4..6: 3 consecutive steps" in msg and "stopped at step 6" in msg, msg
    assert "detected at step 10" in msg and "max_consecutive_skips=3" in msg, msg
    assert _complete_steps(out) == [5]  # step 10 was not saved
    rows = [r for r in pretrain.read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["skipped"]) for r in rows] == [(5, 2.0)]  # logged count of skips


def test_skip_guard_counts_across_fetches():
    guard = validation.SkipGuard(3)
    guard.update(1, [0, 1, 1])
    guard.update(4, [0, 1])
    assert guard.streak == 1 and guard.total == 3
    with pytest.raises(validation.TooManySkippedSteps, match=r"steps 5\.\.7.*stopped at step 7"):
        guard.update(6, [1, 1, 0])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(inputs, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    out = tmp_path / "run"
    args = _args(inputs, out, "--steps", "4", "--save-every", "2")
    calls = {"n": 0}
    handler = ocp.JsonCheckpointHandler
    json_save, json_async_save = handler.save, handler.async_save

    def maybe_fail():
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    def save(self, *a, **k):
        maybe_fail()
        return json_save(self, *a, **k)

    async def async_save(self, *a, **k):
        maybe_fail()
        return await json_async_save(self, *a, **k)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", save)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", async_save)
    with pytest.raises(validation.CheckpointWriteError) as info:
        pretrain.run(args)
    msg = str(info.value)
    assert "checkpoint of step 4" in msg and "the disk is full" in msg, msg
    assert "newest complete checkpoint is step 2" in msg and "intact" in msg, msg
    assert info.value.errno == errno.ENOSPC
    assert _complete_steps(out) == [2]
    state, extra = pretrain.restore_state(out)
    assert int(state.step) == 2 and extra["step"] == 2
    monkeypatch.undo()
    summary = pretrain.run(args)  # space freed: the rerun resumes from step 2 and finishes
    assert summary["resumed_from"] == 2


# --------------------------------------------------------------------------- bad inputs


def _no_training_happened(out: Path) -> None:
    assert not (out / "checkpoints").exists() or not _complete_steps(out)
    assert not (out / "metrics.jsonl").exists()


def test_output_dir_that_cannot_be_created(inputs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "sub"
    with pytest.raises(validation.OutputDirError, match=r"a_file is a file, not a directory"):
        pretrain.run(_args(inputs, out, "--steps", "2"))
    assert blocker.read_text() == "not a directory"
    assert pretrain.main(_args(inputs, out, "--steps", "2")) == 2
    assert "error: --output-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("missing.txt", None, FileNotFoundError, r"corpus path not found: .*missing\.txt"),
        ("empty.txt", b"  \n\n", data.CorpusError, r"empty\.txt: the file is empty"),
        ("binary.txt", b"PK\x03\x04\x00\x00abc", data.CorpusError, r"binary\.txt:1: not a text"),
        (
            "latin1.txt",
            "caf\xe9 ol\xe9\n".encode("latin-1"),
            data.CorpusError,
            r"latin1\.txt:1: not UTF-8",
        ),
        (
            "bad.jsonl",
            b'{"text": "fine"}\n{"text": "cut\n',
            data.CorpusError,
            r"bad\.jsonl:2: not valid JSON",
        ),
        (
            "notext.jsonl",
            b'{"text": "fine"}\n{"body": "no text field"}\n',
            data.CorpusError,
            r"notext\.jsonl:2: expected a JSON object with a string field \"text\", got keys",
        ),
    ],
)
def test_bad_corpus_files_are_refused_before_training(
    inputs, tmp_path, name, content, error, message
):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        pretrain.run(_args(inputs, out, "--steps", "2", corpus=path))
    _no_training_happened(out)
    assert pretrain.main(_args(inputs, out, "--steps", "2", corpus=path)) == 2


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (
            ["model.vocab_size=100"],
            pretrain.ConfigError,
            r"model\.vocab_size=100 is smaller than the tokenizer's \d+",
        ),
        (["--seq-len", "2"], pretrain.ConfigError, r"data\.seq_len=2 is too short.*at least"),
        (
            ["optimizer.total_steps=null", "optimizer.warmup_steps=10"],
            validation.InputError,
            r"warmup_steps=10 is longer than the learning-rate schedule \(train\.steps=4\)",
        ),
        (
            ["optimizer.grad_accum_steps=3"],
            pretrain.ConfigError,
            r"batch_size=8 must be a multiple of optimizer\.grad_accum_steps=3",
        ),
        (["train.save_every=0"], pretrain.ConfigError, r"save_every must be a positive integer"),
        (
            ["train.max_consecutive_skips=0"],
            validation.InputError,
            r"max_consecutive_skips must be a positive integer",
        ),
    ],
)
def test_invalid_settings_are_refused_before_training(inputs, tmp_path, extra, error, message):
    out = tmp_path / "run"
    with pytest.raises(error, match=message):
        extra = extra if extra[0].startswith("--") else ["--set", *extra]
        pretrain.run(_args(inputs, out, "--steps", "4", *extra))
    _no_training_happened(out)


def test_token_ids_outside_the_vocabulary(inputs):
    from funnel_jax.tokenizer import FunnelTokenizer

    tok = FunnelTokenizer.from_pretrained(inputs[1])
    with pytest.raises(ValueError, match=r"corpus: token id \d+ is outside the vocabulary"):
        data.tokenize_documents(tok, ["Kalo mine rusa. Tevo pida."], vocab_size=8)
    with pytest.raises(ValueError, match=r"batch: token id 7 is outside .*\[0, 7\)"):
        data.validate_token_ids(np.array([[1, 7]]), 7, "batch")


def test_checkpoint_of_another_model_is_refused(inputs, finished_run, tmp_path):
    # The same output directory with another model size: refused, naming the setting.
    with pytest.raises(pretrain.ConfigError, match=r"model\.d_model: saved 32, now 48"):
        pretrain.run(_args(inputs, finished_run, "--steps", "4", "--set", "model.d_model=48"))
    # Checkpoints of a 32-wide model under a 48-wide run config: every parameter is named.
    out = tmp_path / "run"
    shutil.copytree(finished_run / "checkpoints", out / "checkpoints")
    with pytest.raises(CheckpointMismatchError) as info:
        pretrain.run(_args(inputs, out, "--steps", "4", "--set", "model.d_model=48"))
    msg = str(info.value)
    assert "shape mismatch" in msg and "(32,) vs abstract state (48,)" in msg, msg[:500]
    assert "params/discriminator" in msg, msg[:500]
    assert _complete_steps(out) == [2, 4]  # nothing lost
    # The finished run is untouched.
    assert _complete_steps(finished_run) == [2, 4]
    assert (finished_run / "final" / "config.json").is_file()


def test_finetune_output_dir_that_cannot_be_created(tmp_path):
    from experiments import finetune

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(validation.OutputDirError, match=r"a_file is a file, not a directory"):
        finetune._prepare_output_dir(blocker / "sub", overwrite=False)
