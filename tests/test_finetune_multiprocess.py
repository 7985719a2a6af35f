"""Fine-tuning on two jax.distributed processes on localhost (CPU, one device each, mesh
data=2) equals a single-process run of the same command on a two-device mesh: the same
evaluation results, predictions and best parameters. Each process trains on its rows of every
global batch and evaluates every dev example; process 0 alone writes the outputs; both take
part in the checkpoint saves. Run once: it starts three Python processes."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import funnel_jax as fj
from tests.test_finetune import make_pretrained_dir, write_sst2
from tests.test_multihost import run_processes, run_single_process


def _args(data, init, out):
    return [
        sys.executable, "-m", "experiments.finetune", "--task", "sst2",
        "--data-dir", str(data), "--init", str(init), "--output-dir", str(out),
        "--max-steps", "6", "--batch-size", "8", "--eval-every", "3", "--save-every", "3",
        "--eval-batch-size", "8", "--max-seq-length", "32", "--learning-rate", "1e-3",
        "--seed", "0", "--no-progress", "--mesh", "data=2",
    ]  # fmt: skip


def test_two_processes_equal_a_single_process_run(tmp_path):
    init = make_pretrained_dir(tmp_path / "pretrain_run")
    # 37 dev examples: five eval batches of 8, the last one padded on both runs.
    data = write_sst2(tmp_path / "sst2", n_train=64, n_dev=37)
    single = run_single_process(_args(data, init, tmp_path / "single"))
    assert "over 2 devices, 1 process(es)" in single

    out = tmp_path / "multi"
    logs = run_processes(_args(data, init, out))
    assert "over 2 devices, 2 process(es)" in logs[0]
    assert "eval step 6" in logs[0] and "eval step" not in logs[1]  # only process 0 prints

    # The metrics (accuracy, f1, matthews_correlation of the 37 examples) are computed in
    # float64 from the same argmax predictions: equal exactly, not within a tolerance.
    ref = json.loads((tmp_path / "single" / "eval_results.json").read_text())
    got = json.loads((out / "eval_results.json").read_text())
    assert got == ref, (got, ref)
    ref_preds = (tmp_path / "single" / "predictions.tsv").read_text().splitlines()
    got_preds = (out / "predictions.tsv").read_text().splitlines()
    assert len(got_preds) == 1 + 37 and got_preds == ref_preds
    history = [json.loads(x) for x in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]

    # The same training: the best parameters equal to float32 round-off (both runs sum the
    # same two per-device gradients; the all-reduce across processes may add them in another
    # order, which changes at most the last bit).
    _, ref_params = fj.from_pretrained(tmp_path / "single" / "best_model")
    _, got_params = fj.from_pretrained(out / "best_model")
    diffs = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), got_params, ref_params
    )
    assert max(jax.tree.leaves(diffs)) < 1e-6, diffs
    # Every process took part in the saves: the checkpoints of steps 3 and 6 are complete.
    steps = sorted(int(p.name) for p in (out / "train_checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6], steps
