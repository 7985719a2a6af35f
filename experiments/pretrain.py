"""ELECTRA (or MLM) pretraining of a Funnel Transformer.

    python -m experiments.pretrain                        # tiny demo: stdlib corpus, < 5 min on CPU
    python -m experiments.pretrain --config base --corpus data/ --output-dir runs/base
    python -m experiments.pretrain --set model.d_model=128 optimizer.learning_rate=5e-4

Settings come from a JSON file in configs/pretrain/ (`--config tiny|base|large` or a path) with
five sections: model (FunnelConfig fields, or "preset": a name in configs/models/), objective,
optimizer, data, train. Any of them can be overridden with `--set SECTION.KEY=VALUE` (VALUE is
parsed as JSON, else taken as a string), and the common ones with their own flags (--steps,
--batch-size, --seq-len, --save-every, --seed, --objective), which win over --set.

Without --corpus the text is the embedded standard-library corpus (funnel_jax.data); a WordPiece
vocabulary is trained on it (data.vocab_size) and cached in OUTPUT_DIR/tokenizer unless
--tokenizer names an existing one. `--data DIR` trains on a directory prepared by
`python -m experiments.prepare_data` instead (its shards through funnel_jax.loader, its
tokenizer; data.seq_len must be the one it was prepared with). Everything lands in --output-dir:

    run_config.json   the resolved settings (a restart must match them)
    tokenizer/        the tokenizer files
    checkpoints/      Orbax training checkpoints (params, optimizer state, step, RNG, data position)
    metrics.jsonl     train metrics every log_every steps, eval metrics at start / eval_every / end
    tb/               TensorBoard event files
    loss_curves.png   the loss curves
    final/            the discriminator as a FunnelForPreTraining model directory (MLM: a
                      FunnelForMaskedLM) with config.json and the tokenizer files
    summary.json      start and end eval metrics, timings

A run started on an output dir holding checkpoints resumes from the newest one and ends with the
same parameters as an uninterrupted run (bit-identical on CPU); a finished run is left as it is.
`--stop-after K` stops (with a checkpoint) after step K as if interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from experiments.common import add_mesh_arguments, initialize_distributed
from funnel_jax.training.files import ConfigError, load_json_object  # noqa: F401 (tests use them)
from funnel_jax.training.overrides import add_set_argument
from funnel_jax.training.pretraining import (  # noqa: F401 (re-exported for tests and notebooks)
    build_from_output_dir,
    format_summary,
    resolve_config_path,
    restore_state,
)
from funnel_jax.training.run_log import read_metrics  # noqa: F401

DEFAULT_CONFIG = "tiny"
DEFAULT_OUTPUT_DIR = "runs/pretrain"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, help="name in configs/pretrain/ or a path")
    p.add_argument(
        "--corpus",
        nargs="+",
        default=None,
        help="text files, directories of *.txt (recursive) or JSON Lines files with a 'text' "
        "field; default: the embedded standard-library corpus",
    )
    p.add_argument("--tokenizer", default=None, help="use this tokenizer directory (no training)")
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="a directory prepared by experiments.prepare_data: train on its shards with its "
        "tokenizer (no --corpus / --tokenizer)",
    )
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--steps", type=int, default=None, help="train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (global)")
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len")
    p.add_argument("--save-every", type=int, default=None, help="train.save_every")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--objective", choices=["electra", "mlm"], default=None, help="objective.name")
    add_set_argument(p, "model.d_model=128 optimizer.learning_rate=5e-4")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    add_mesh_arguments(p)
    p.add_argument(
        "--compile-cache",
        default=os.environ.get("FUNNEL_JAX_COMPILE_CACHE", "~/.cache/funnel_jax/xla"),
        help="JAX persistent compilation cache directory ('' to disable)",
    )
    return p.parse_args(argv)


def load_run_config(args: argparse.Namespace):
    """The PretrainConfig of the command: file < --set < dedicated flags, checked."""
    from funnel_jax.training.pretraining import load_pretrain_config

    flags = {
        ("train", "steps"): args.steps,
        ("data", "batch_size"): args.batch_size,
        ("data", "seq_len"): args.seq_len,
        ("train", "save_every"): args.save_every,
        ("train", "seed"): args.seed,
        ("objective", "name"): args.objective,
    }
    cfg = load_pretrain_config(args.config, args.set, flags)
    return cfg.replace(
        corpus=tuple(str(Path(p).absolute()) for p in args.corpus) if args.corpus else None,
        tokenizer=str(Path(args.tokenizer).absolute()) if args.tokenizer else None,
        data_dir=str(Path(args.data).absolute()) if args.data else None,
        mesh=args.mesh,
    )


def run(argv: list[str] | None = None) -> dict:
    """Run (or resume) a pretraining job; returns the summary dict (see module docstring).

    With --stop-after K < steps it returns {"stopped_at": K, ...} after saving a checkpoint.
    On SIGTERM / SIGINT it returns {"stopped_at": step, "signal": "SIGTERM", ...} (a summary with
    "signal" when the signal came during the final evaluation and export, which completes).
    """
    args = parse_args(argv)
    from funnel_jax import preemption, runtime
    from funnel_jax.training.pretraining import pretrain

    runtime.apply_accelerator_settings()  # before jax starts its backend (a no-op on CPU)
    # SIGTERM / SIGINT from the start on only set a flag (funnel_jax/preemption.py), read before
    # training, after each step, and once the final export is complete.
    stopper = preemption.PreemptionHandler().install()
    try:
        initialize_distributed(args)
        cfg = load_run_config(args)
        runtime.enable_compile_cache(args.compile_cache)
        return pretrain(
            cfg,
            args.output_dir,
            stop_after=args.stop_after,
            progress=not args.no_progress,
            stopper=stopper,
        )
    finally:
        stopper.uninstall()


def main(argv=None) -> int:
    from funnel_jax import runtime

    runtime.use_jemalloc()
    from funnel_jax import preemption, validation

    try:
        result = run(argv)
    except (ConfigError, FileNotFoundError, *validation.user_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return preemption.exit_code_of(result)


if __name__ == "__main__":
    sys.exit(main())
