"""Fine-tune and evaluate a Funnel Transformer on a classification, regression, multiple-choice,
tagging or question-answering task.

    python -m experiments.finetune --task mrpc --data-dir glue/MRPC --init runs/pretrain \
        --output-dir runs/mrpc
    python -m experiments.finetune --task classification --train-file train.csv \
        --dev-file dev.csv --text-column review --label-column stars --init runs/pretrain \
        --output-dir runs/reviews
    python -m experiments.finetune --task squad_v2 --data-dir squad --init path/to/model_dir \
        --output-dir runs/squad2

Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli (official GLUE TSV files in --data-dir),
classification / regression (CSV, TSV or JSON Lines: --train-file, --dev-file and the column
flags), multiple_choice / race / swag (JSON Lines, see funnel_jax/tasks/multiple_choice.py and
experiments/convert_race_swag.py), token_classification / conll2003 (CoNLL files),
question_answering / squad / squad_v2 (SQuAD JSON). See docs/finetuning.md.

Model, hyper-parameters, evaluation, outputs and resuming: see funnel_jax/training/finetuning.py
(`funnel_jax.finetune(config, workdir)`, which this command calls) and docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from experiments.common import add_mesh_arguments, initialize_distributed
from funnel_jax.training.files import ConfigError  # noqa: F401 (tests use it)
from funnel_jax.training.finetuning import (  # noqa: F401 (re-exported for tests)
    DEFAULTS,
    FLOAT_KEYS,
    INT_KEYS,
    _prepare_output_dir,
    load_preset,
)
from funnel_jax.training.overrides import add_set_argument
from funnel_jax.training.presets import preset_dir

PRESET_DIR = preset_dir("finetune")
DEFAULT_SAVE_EVERY = 500
SET_SECTIONS = ("settings", "loop")


def build_parser() -> argparse.ArgumentParser:
    from funnel_jax.tasks import TASK_NAMES

    p = argparse.ArgumentParser(
        prog="python -m experiments.finetune",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("task and data")
    g.add_argument("--task", required=True, help=f"one of: {', '.join(TASK_NAMES)}")
    g.add_argument("--data-dir", help="directory with the task's files (train.tsv, dev.tsv, ...)")
    g.add_argument("--train-file", help="training file (overrides the one in --data-dir)")
    g.add_argument("--dev-file", help="dev file (overrides the one(s) in --data-dir)")
    g.add_argument("--text-column", help="classification/regression: text column (default text)")
    g.add_argument("--text-pair-column", help="classification/regression: second text column")
    g.add_argument("--label-column", help="classification/regression: label column (label)")
    g.add_argument("--labels", help="comma-separated label set (default: those of the train set)")
    g.add_argument("--max-train-examples", type=int, help="use only the first N train examples")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev examples")
    g.add_argument(
        "--skip-malformed-lines",
        action="store_true",
        help="skip table/JSONL lines with the wrong number of fields or bad JSON (with a "
        "warning) instead of stopping",
    )

    g = p.add_argument_group("model")
    g.add_argument("--init", help="pretraining output dir or model dir to start from")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the one of --init)")
    g.add_argument("--model-config", help="train from scratch: config file or configs/models name")
    g.add_argument("--output-dir", required=True)
    g.add_argument(
        "--overwrite-output-dir",
        action="store_true",
        help="replace the checkpoints / model of an earlier run in --output-dir",
    )
    g.add_argument("--preset", help="preset JSON (default: configs/finetune/TASK.json)")

    g = p.add_argument_group("hyper-parameters (override the preset)")
    for key in DEFAULTS:
        flag = "--" + key.replace("_", "-")
        kind = int if key in INT_KEYS else float if key in FLOAT_KEYS else str
        g.add_argument(flag, type=kind, default=None, help=f"default: {DEFAULTS[key]}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-every", type=int, help="steps between loss updates (default 10)")
    p.add_argument(
        "--max-consecutive-skips",
        type=int,
        help="stop after this many steps in a row with a non-finite loss or gradients (their "
        "updates are skipped and counted); default 10",
    )
    p.add_argument(
        "--save-every",
        type=int,
        help="steps between training checkpoints (also saved at the end and on SIGTERM/SIGINT; "
        f"0: only then); default {DEFAULT_SAVE_EVERY}",
    )
    add_set_argument(  # settings.*: the hyper-parameters above; loop.*: FinetuneLoopConfig
        p, "settings.learning_rate=2e-5 loop.log_every=50"
    )
    add_mesh_arguments(p)
    return p


def load_config(args: argparse.Namespace):
    """The FinetuneConfig of the command: DEFAULTS < preset < --set settings.* < flags."""
    from funnel_jax.training.config import (
        FinetuneDataConfig,
        FinetuneLoopConfig,
        FinetuneModelConfig,
    )
    from funnel_jax.training.finetuning import load_finetune_config
    from funnel_jax.training.overrides import apply_overrides

    sets = apply_overrides({}, args.set, SET_SECTIONS)
    given = {**sets.get("settings", {})}
    given.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    loop = {**sets.get("loop", {})}  # --set loop.* < the flags given
    for key in ("log_every", "save_every", "max_consecutive_skips"):
        if getattr(args, key) is not None:
            loop[key] = getattr(args, key)
    try:
        loop_cfg = FinetuneLoopConfig(**loop)
    except TypeError as e:
        raise ConfigError(f"--set loop.*: {e}") from None
    labels = tuple(x.strip() for x in args.labels.split(",")) if args.labels else None
    names = [f.name for f in dataclasses.fields(FinetuneDataConfig) if f.name != "labels"]
    data = FinetuneDataConfig(labels=labels, **{k: getattr(args, k) for k in names})
    model = FinetuneModelConfig(
        init=args.init, tokenizer=args.tokenizer, model_config=args.model_config
    )
    return load_finetune_config(
        args.task,
        given,
        preset=args.preset,
        data=data,
        model=model,
        loop=loop_cfg,
        mesh=args.mesh,
        overwrite_output_dir=args.overwrite_output_dir,
    )


def run(argv: list[str] | None = None) -> dict:
    """Fine-tune and evaluate as the command does; returns what funnel_jax.finetune returns
    (eval_results.json's metrics; with "signal" when stopped by SIGTERM / SIGINT)."""
    args = build_parser().parse_args(argv)
    from funnel_jax import preemption, runtime
    from funnel_jax.training.finetuning import finetune

    runtime.apply_accelerator_settings()  # before jax starts its backend (a no-op on CPU)
    # SIGTERM / SIGINT only set a flag (funnel_jax/preemption.py), read during start-up, after
    # each training step, and once the final export is complete.
    stopper = preemption.PreemptionHandler().install()
    try:
        initialize_distributed(args)
        return finetune(
            load_config(args), args.output_dir, progress=not args.no_progress, stopper=stopper
        )
    finally:
        stopper.uninstall()


def main(argv=None) -> int:
    from funnel_jax import runtime

    runtime.use_jemalloc()
    from funnel_jax import preemption
    from funnel_jax.tasks import DataError, SettingsError
    from funnel_jax.validation import user_errors
    from funnel_jax.weights import WeightsError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    errors = (ConfigError, DataError, SettingsError, WeightsError, FileNotFoundError)
    try:
        result = run(argv)
    except (*errors, *user_errors()) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return preemption.exit_code_of(result)  # 143 / 130 when stopped by SIGTERM / SIGINT


if __name__ == "__main__":
    sys.exit(main())
