"""Two processes on localhost with jax.distributed (CPU, one device each) pretrain a few steps,
stop with a checkpoint, resume, and end with the parameters of a single-process run of the
same global batches on a two-device mesh. Run once: it starts four Python processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import funnel_jax as fj
from funnel_jax.tokenizer import FunnelTokenizer

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "The funnel transformer pools the hidden sequence at the start of each block.",
    "A small generator fills masked positions and the discriminator detects replacements.",
    "Checkpoints are saved every few steps so that a preempted run can resume.",
    "Each process reads only its share of the data and the mesh shards the batch.",
    "The decoder upsamples the last block back to the full length for token tasks.",
    "Relative attention adds a positional term and a token type term to the content score.",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    corpus = tmp / "corpus.txt"
    rng = np.random.RandomState(0)
    docs = []
    for _ in range(40):
        docs.append(" ".join(SENTENCES[i] for i in rng.permutation(len(SENTENCES))))
    corpus.write_text("\n\n".join(docs) + "\n")
    tok = FunnelTokenizer.train([corpus.read_text()], vocab_size=300)
    tok.save_pretrained(tmp / "tok")
    return tmp, corpus


def _args(tmp, corpus, out, *extra):
    return [
        sys.executable, "-m", "experiments.pretrain",
        "--corpus", str(corpus), "--tokenizer", str(tmp / "tok"), "--output-dir", str(out),
        "--steps", "6", "--save-every", "2", "--seq-len", "32", "--batch-size", "8",
        "--no-progress", "--compile-cache", os.environ["FUNNEL_JAX_COMPILE_CACHE"],
        "--mesh", "data=2",
        "--set", "data.num_shards=2", "data.eval_batches=1", "data.eval_fraction=0.2",
        "model.block_sizes=[1,1]", "model.d_model=32", "model.n_head=4", "model.d_head=8",
        "model.d_inner=64", "model.hidden_dropout=0.1", "train.log_every=3",
        "optimizer.warmup_steps=2",
        *extra,
    ]  # fmt: skip


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_single_process(args: list[str], devices: int = 2, timeout: int = 600) -> str:
    """Run the command `args` as one process with `devices` CPU devices (the reference of a
    multi-process run); returns its standard output, after checking it exited with status 0."""
    proc = subprocess.run(
        args, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_processes(args: list[str], n: int = 2, timeout: int = 600) -> list[str]:
    """Run the command `args` as `n` jax.distributed processes on localhost (one CPU device
    each; the coordinator flags of experiments/pretrain.py and finetune.py appended); returns
    each process's output, after checking that all exited with status 0."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                *args,
                "--coordinator-address",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(n)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:  # a process left waiting for a peer that failed
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i}: status {p.returncode}\n{text[-4000:]}"
    return outputs


def _run_two_processes(tmp, corpus, out, *extra):
    return run_processes(_args(tmp, corpus, out, *extra))


def test_two_processes_save_restore_and_equal_a_single_process_run(setup):
    tmp, corpus = setup
    single = run_single_process(_args(tmp, corpus, tmp / "single"))
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} over 2 devices, 1 process" in single

    out = tmp / "multi"
    # The (async) save of step 2 is in flight while steps 3 and 4 run on both processes.
    first = _run_two_processes(tmp, corpus, out, "--stop-after", "4")
    assert "2 process(es)" in first[0] and "stopped after step 4" in first[0]
    assert not (out / "final").exists()
    second = _run_two_processes(tmp, corpus, out)
    assert "resuming from the checkpoint of step 4" in second[0]
    assert "resuming" not in second[1]  # only process 0 prints

    _, ref = fj.from_pretrained(tmp / "single" / "final")
    _, got = fj.from_pretrained(out / "final")
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), got, ref
    )
    worst = max(jax.tree.leaves(diffs))
    assert worst < 1e-6, worst
    from funnel_jax.checkpoint import TrainCheckpointer

    with TrainCheckpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [2, 4, 6]
    # Only process 0 wrote the logs.
    assert (out / "metrics.jsonl").is_file() and (out / "loss_curves.png").is_file()
