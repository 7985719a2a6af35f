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

The model: `--init DIR` is a pretraining output dir (its `final/` model and its tokenizer are
used) or any directory `funnel_jax.from_pretrained` loads. The backbone is loaded (the base
model, without decoder, for sequence classification and multiple choice; the full model for
tagging and QA) and the task head initialised fresh; a directory that already holds this
task's head with the same labels is loaded whole. Without --init, `--model-config` (a file or
a name in configs/models/) trains from scratch, with `--tokenizer` or a vocabulary trained on
the training text.

Hyper-parameters: built-in defaults < the task's preset (configs/finetune/TASK.json, or
`--preset FILE`) < flags. AdamW (b1 0.9, b2 0.99, eps 1e-6 as the original), linear warm-up
(10% of the steps) and linear decay to 0, weight decay 0.01 (not on biases / layer norms),
global-norm clipping 1.0, optional layer-wise learning-rate decay (funnel_jax.optim).

Evaluation on the dev set(s) after every epoch (or every --eval-every steps) and at the end;
the best parameters by the task's main metric (or --metric-for-best) are kept with Orbax
(OUTPUT_DIR/checkpoints) and exported at the end to OUTPUT_DIR/best_model (a model directory
with the tokenizer files: `funnel_jax.from_pretrained` loads it). OUTPUT_DIR also gets
eval_results.json (the best evaluation: metric name -> value), eval_history.jsonl (every
evaluation), predictions.* (the dev predictions of the best evaluation), train_config.json and
tokenizer/. `run(argv) -> dict` is the same as the command, for tests and notebooks.

Resuming: OUTPUT_DIR/train_checkpoints holds Orbax training checkpoints (params, optimizer
state, step, dropout RNG, the position in the shuffled data, the best-metric bookkeeping) every
--save-every steps and at the end. Running the same command again on OUTPUT_DIR resumes from
the newest complete one and ends bit-identical (CPU) to an uninterrupted run; a finished run is
left as it is; other settings are refused, naming the field (train_config.json). SIGTERM /
SIGINT save a checkpoint of the step reached and exit with status 143 / 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from experiments.common import (
    ConfigError,
    load_json_object,
    save_tokenizer_atomic,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
PRESET_DIR = ROOT / "configs" / "finetune"
MODEL_CONFIG_DIR = ROOT / "configs" / "models"

logger = logging.getLogger("funnel_jax")

# Built-in defaults: the original fine-tuning recipe (FACTS.md: pytorch/README.md and options.py
# of laiguokun/Funnel-Transformer). Task presets and flags override them.
DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "max_steps": None,  # when set, wins over epochs
    "batch_size": 16,
    "eval_batch_size": None,  # None: batch_size
    "learning_rate": 1e-5,
    "warmup_ratio": 0.1,
    "warmup_steps": 0,  # > 0 wins over warmup_ratio
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "layerwise_lr_decay": 1.0,
    "b1": 0.9,
    "b2": 0.99,
    "eps": 1e-6,
    "grad_accum_steps": 1,
    "max_seq_length": 128,
    "seed": 42,
    "eval_every": 0,  # 0: after every epoch
    "dtype": "float32",
    "hidden_dropout": None,  # None: the model config's
    "attention_dropout": None,
    "vocab_size": 8000,  # WordPiece vocabulary trained when there is no tokenizer
    "metric_for_best": None,  # None: the task's main metric
    # multiple choice
    "max_qa_length": 128,
    # question answering
    "doc_stride": 128,
    "max_query_length": 64,
    "max_answer_length": 64,
    "n_best_size": 20,
    "null_score_diff_threshold": 0.0,
}
INT_KEYS = {
    "epochs",
    "max_steps",
    "batch_size",
    "eval_batch_size",
    "warmup_steps",
    "grad_accum_steps",
    "max_seq_length",
    "seed",
    "eval_every",
    "vocab_size",
    "max_qa_length",
    "doc_stride",
    "max_query_length",
    "max_answer_length",
    "n_best_size",
}
FLOAT_KEYS = {
    "learning_rate",
    "warmup_ratio",
    "weight_decay",
    "clip_norm",
    "layerwise_lr_decay",
    "b1",
    "b2",
    "eps",
    "hidden_dropout",
    "attention_dropout",
    "null_score_diff_threshold",
}
STR_KEYS = {"dtype", "metric_for_best"}

DEFAULT_SAVE_EVERY = 500
TRAIN_CHECKPOINTS = "train_checkpoints"  # resume checkpoints; "checkpoints": the best params
KEEP_TRAIN_CHECKPOINTS = 2
# train_config.json entries a restart may change: the checkpoint interval, and descriptions of
# the model / tokenizer source with paths as typed (the absolute paths are under "source").
RESTART_MAY_CHANGE = ("checkpointing", "model", "tokenizer")


# --------------------------------------------------------------------------- arguments


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
    p.add_argument("--log-every", type=int, default=10, help="steps between loss updates")
    p.add_argument(
        "--max-consecutive-skips",
        type=int,
        default=10,
        help="stop after this many steps in a row with a non-finite loss or gradients (their "
        "updates are skipped and counted); default 10",
    )
    p.add_argument(
        "--save-every",
        type=int,
        default=DEFAULT_SAVE_EVERY,
        help="steps between training checkpoints (also saved at the end and on SIGTERM/SIGINT; "
        f"0: only then); default {DEFAULT_SAVE_EVERY}",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the rest); default: data parallel "
        "over every device when there are several",
    )
    return p


def load_preset(task: str, preset: str | None) -> tuple[dict, str | None]:
    """(settings, path) of the preset: --preset FILE, else configs/finetune/TASK.json if any."""
    if preset:
        path = Path(preset)
        if not path.is_file():
            path = PRESET_DIR / f"{preset}.json"
        if not path.is_file():
            raise ConfigError(f"preset not found: {preset} (a file or a name in {PRESET_DIR})")
    else:
        path = PRESET_DIR / f"{task}.json"
        if not path.is_file():
            return {}, None
    d = load_json_object(path)
    settings = {k: v for k, v in d.items() if not k.startswith("_") and k != "task"}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    return settings, str(path)


def resolve_settings(args) -> tuple[dict, str | None]:
    preset, preset_path = load_preset(args.task, args.preset)
    settings = dict(DEFAULTS)
    settings.update(preset)
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    # A length in epochs (warm-up as a ratio) on the command line replaces the preset's steps;
    # a preset's warm-up in steps keeps its share of the run when the flags change the length.
    if args.epochs is not None and args.max_steps is None:
        settings["max_steps"] = None
    length_changed = args.epochs is not None or args.max_steps is not None
    warmup_given = args.warmup_ratio is not None or args.warmup_steps is not None
    if length_changed and not warmup_given and preset.get("warmup_steps"):
        if preset.get("max_steps"):
            settings["warmup_ratio"] = preset["warmup_steps"] / preset["max_steps"]
        settings["warmup_steps"] = 0
    if args.warmup_ratio is not None and args.warmup_steps is None:
        settings["warmup_steps"] = 0
    _check_settings(settings)
    return settings, preset_path


def _check_settings(s: dict) -> None:
    def fail(key, msg):
        raise ConfigError(f"{key.replace('_', '-')}: {msg} (got {s[key]!r})")

    for key in ("batch_size", "max_seq_length", "grad_accum_steps", "n_best_size"):
        if not isinstance(s[key], int) or s[key] < 1:
            fail(key, "must be a positive integer")
    if s["epochs"] < 0:
        fail("epochs", "must be >= 0")
    if s["max_steps"] is not None and s["max_steps"] < 0:
        fail("max_steps", "must be >= 0")
    if s["batch_size"] % s["grad_accum_steps"]:
        fail("batch_size", f"must be a multiple of grad-accum-steps {s['grad_accum_steps']}")
    if s["eval_batch_size"] is not None and s["eval_batch_size"] < 1:
        fail("eval_batch_size", "must be positive")
    if s["dtype"] not in ("float32", "bfloat16"):
        fail("dtype", "must be float32 or bfloat16")
    if s["eval_every"] < 0:
        fail("eval_every", "must be >= 0")


# --------------------------------------------------------------------------- data


def _limit(examples: list, n: int | None) -> list:
    return examples if n is None else examples[:n]


def read_data(task, args) -> tuple[list, dict[str, list], dict[str, Path]]:
    """Read and check every file before anything else happens (DataError names file:line)."""
    from funnel_jax.tasks import DataError

    if args.train_file:
        train_path = Path(args.train_file)
    elif args.data_dir:
        train_path = task.train_file(args.data_dir)
    else:
        raise ConfigError("give --data-dir or --train-file")
    if args.dev_file:
        eval_paths = {"": Path(args.dev_file)}
    elif args.data_dir:
        eval_paths = task.eval_files(args.data_dir)
    else:
        raise ConfigError("give --data-dir or --dev-file")
    for path in [train_path, *eval_paths.values()]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    train = _limit(task.read(train_path), args.max_train_examples)
    evals = {name: _limit(task.read(p), args.max_eval_examples) for name, p in eval_paths.items()}
    if not train:
        raise DataError(f"{train_path}: no training examples")
    task.setup(train, evals)
    return (
        train,
        evals,
        {"train": train_path, **{f"dev{n and '_' + n}": p for n, p in eval_paths.items()}},
    )


# --------------------------------------------------------------------------- model


def resolve_init(path: str) -> tuple[Path, list[Path]]:
    """(model dir, tokenizer dirs to try) of --init: a pretraining output dir (final/ and
    tokenizer/) or a model directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--init: no such directory: {p}")
    if (p / "final" / "config.json").is_file():
        model_dir = p / "final"
    elif (p / "config.json").is_file():
        model_dir = p
    else:
        raise FileNotFoundError(
            f"--init {p}: neither a model directory (config.json) nor a pretraining output "
            "directory (final/config.json)"
        )
    return model_dir, [model_dir, p / "tokenizer", p, model_dir.parent / "tokenizer"]


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()


def load_tokenizer(
    args, init_candidates: list[Path], texts_fn, vocab_size: int, saved: Path | None = None
):
    """(tokenizer, how it was found). `saved`: the tokenizer directory of the run being resumed,
    used instead of training a vocabulary again (training is not bit-reproducible)."""
    from funnel_jax.tokenizer import FunnelTokenizer

    if args.tokenizer:
        t = Path(args.tokenizer)
        if t.is_file():
            return FunnelTokenizer.from_vocab(t), f"vocabulary {t}"
        if not t.is_dir():
            raise FileNotFoundError(f"--tokenizer: no such file or directory: {t}")
        return FunnelTokenizer.from_pretrained(t), f"{t}"
    for d in init_candidates:
        if _has_tokenizer(d):
            return FunnelTokenizer.from_pretrained(d), f"{d}"
    if init_candidates:
        raise FileNotFoundError(
            f"no tokenizer next to --init (looked in {', '.join(map(str, init_candidates))}); "
            "pass --tokenizer DIR"
        )
    if saved is not None and _has_tokenizer(saved):
        tok = FunnelTokenizer.from_pretrained(saved)
    else:
        tok = FunnelTokenizer.train(texts_fn(), vocab_size=vocab_size, min_frequency=1)
    return tok, f"trained on the training text ({len(tok)} tokens)"


def load_model_config(name: str):
    from funnel_jax.config import FunnelConfig

    path = Path(name)
    if not path.is_file():
        path = MODEL_CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
    if not path.is_file():
        known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"--model-config {name}: not a file nor one of {known}")
    return FunnelConfig.from_json_file(path)


# The head of each task class: its attribute and the rank of the hidden state it takes.
HEADS = {
    "FunnelForSequenceClassification": ("classifier", 2),
    "FunnelForMultipleChoice": ("classifier", 2),
    "FunnelForTokenClassification": ("classifier", 3),
    "FunnelForQuestionAnswering": ("qa_outputs", 3),
}


def init_head(module, rng) -> dict:
    """Fresh parameters of the task head alone (the module's own initialisers; running only the
    head keeps the whole model's forward pass out of the initialisation)."""
    import flax.linen as nn
    import jax.numpy as jnp

    attr, rank = HEADS[type(module).__name__]
    hidden = jnp.zeros((1,) * (rank - 1) + (module.config.d_model,), jnp.float32)

    def call(m, h):
        head = getattr(m, attr)
        return head(h, True) if rank == 2 else head(h)

    return nn.meta.unbox(module.init({"params": rng}, hidden, method=call)["params"])


BACKBONE = {
    "FunnelForSequenceClassification": "FunnelBaseModel",
    "FunnelForMultipleChoice": "FunnelBaseModel",
    "FunnelForTokenClassification": "FunnelModel",
    "FunnelForQuestionAnswering": "FunnelModel",
}


def _config_changes(task, settings) -> dict:
    changes = dict(task.config_overrides())
    for key in ("hidden_dropout", "attention_dropout"):
        if settings[key] is not None:
            changes[key] = float(settings[key])
    return changes


def build_model(task, settings, args, tokenizer, trained_vocab: bool, rng):
    """(module, params, description). The head is fresh unless the init dir holds this task's
    head with the same labels."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from funnel_jax import from_pretrained, weights
    from funnel_jax.models import MODEL_CLASSES, abstract_params, init_params

    dtype = jnp.bfloat16 if settings["dtype"] == "bfloat16" else jnp.float32
    cls = MODEL_CLASSES[task.model_class]
    changes = _config_changes(task, settings)

    if not args.init:
        if not args.model_config:
            raise ConfigError("give --init (a pretrained model) or --model-config (from scratch)")
        config = load_model_config(args.model_config)
        if trained_vocab or config.vocab_size < len(tokenizer):
            config = config.replace(vocab_size=len(tokenizer))
        config = config.replace(architectures=None, **changes)
        module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
        params = jax.jit(lambda k: init_params(module, k))(rng)
        return module, params, f"from scratch ({args.model_config})"

    model_dir, _ = resolve_init(args.init)
    saved = weights.load_config(model_dir)
    saved_arch = (saved.architectures or ("FunnelModel",))[0]
    same_head = (
        saved_arch == task.model_class
        and saved.num_labels == changes["num_labels"]
        and dict(saved.id2label) == dict(changes["id2label"])
    )
    if same_head:
        loaded, params = from_pretrained(model_dir, model_class=cls, dtype=jnp.float32)
        config = loaded.config.replace(**changes)
        module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
        return module, params, f"{model_dir} ({saved_arch}, head included)"

    backbone = BACKBONE[task.model_class]
    try:
        loaded, backbone_params = from_pretrained(
            model_dir, model_class=backbone, dtype=jnp.float32
        )
    except weights.WeightsError as e:
        raise weights.WeightsError(
            f"--init {model_dir}: cannot load a {backbone} backbone for {task.model_class} ({e})"
        ) from None
    config = loaded.config.replace(architectures=None, **changes)
    module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
    params = {"funnel": backbone_params, **init_head(module, rng)}
    want = {p: tuple(v.shape) for p, v in flatten_dict(abstract_params(module)).items()}
    have = {p: tuple(v.shape) for p, v in flatten_dict(params).items()}
    if want != have:
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise weights.WeightsError(
            f"--init {model_dir}: the parameters do not fit {task.model_class}: {diff[:5]}"
        )
    fresh = sorted("/".join(p) for p in flatten_dict(params) if p[0] != "funnel")
    logger.warning("newly initialised head parameters: %s", ", ".join(fresh))
    return module, params, f"{model_dir} ({saved_arch} backbone as {backbone}; fresh head)"


# --------------------------------------------------------------------------- training helpers


def _pad_rows(arrays: dict, n: int) -> dict:
    """Append copies of the last row so that every array has n rows."""
    import numpy as np

    have = next(iter(arrays.values())).shape[0]
    if have == n:
        return arrays
    return {k: np.concatenate([v, np.repeat(v[-1:], n - have, axis=0)]) for k, v in arrays.items()}


def _mesh_setup(args, module, state, batch_size):
    """(put_batch, state shardings, batch sharding) on a mesh, or None on one device."""
    import jax

    from funnel_jax import sharding

    if not args.mesh and jax.device_count() == 1:
        return None
    mesh = sharding.make_mesh(args.mesh)
    sharding.check_divisible(batch_size, mesh)
    state_sh = sharding.tree_shardings_like_params(
        state, sharding.param_shardings(module, mesh), mesh
    )
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices")
    return (lambda b: sharding.shard_batch(b, mesh)), state_sh, sharding.batch_sharding(mesh)


def predict(eval_fn, params, features, batch_size: int) -> dict:
    """Run the model over all features (the last batch padded); task outputs as numpy."""
    import jax
    import numpy as np

    inputs = features.inputs
    n = len(features)
    chunks: dict[str, list] = {}
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        real = next(iter(batch.values())).shape[0]
        out = jax.device_get(eval_fn(params, _pad_rows(batch, batch_size)))
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[:real])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _is_better(value: float, best: float | None) -> bool:
    if best is None:
        return True
    if value != value:  # nan never improves
        return False
    return best != best or value > best


def _prepare_output_dir(out_dir: Path, overwrite: bool) -> dict | None:
    """Check that OUTPUT_DIR can be written. Returns the train_config.json of an earlier run in
    it (to resume or to leave as it is, if the settings match), or None for a fresh start; with
    `overwrite` the outputs of an earlier run are removed first."""
    from funnel_jax import validation

    validation.check_output_dir(out_dir)  # created, and writable
    names = ("checkpoints", TRAIN_CHECKPOINTS, "best_model")
    stale = [out_dir / n for n in names if (out_dir / n).exists()]
    if not overwrite:
        config_path = out_dir / "train_config.json"
        if config_path.is_file():
            return load_json_object(config_path)
        if stale:
            raise ConfigError(
                f"{out_dir} holds an earlier run ({', '.join(p.name for p in stale)}) without its "
                "train_config.json; use another --output-dir or --overwrite-output-dir"
            )
    for p in stale:
        shutil.rmtree(p)
    for pattern in ("predictions*", "null_odds*", "eval_results.json", "train_config.json"):
        for p in out_dir.glob(pattern):
            p.unlink()
    return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_diff(saved: dict, now: dict) -> list[str]:
    """The entries of `now` (dotted names, e.g. settings.learning_rate) that differ in the
    saved train_config.json, except RESTART_MAY_CHANGE."""
    now = json.loads(json.dumps(now))  # compare as read back (tuples -> lists, int keys -> str)
    keep = [k for k in now if k not in RESTART_MAY_CHANGE]
    a = _flatten({k: saved[k] for k in keep if k in saved})
    b = _flatten({k: now[k] for k in keep})
    missing = "(absent)"
    return [
        f"{k}: saved {a.get(k, missing)!r}, now {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def _check_same_run(out_dir: Path, saved: dict | None, now: dict) -> None:
    if saved is None:
        return
    diffs = _config_diff(saved, now)
    if diffs:
        raise ConfigError(
            f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); rerun with the same "
            "settings to resume it, or use another --output-dir (or --overwrite-output-dir to "
            "start over)"
        )


def _is_finished(out_dir: Path) -> bool:
    from funnel_jax.checkpoint import is_orbax_model_dir

    return (out_dir / "eval_results.json").is_file() and is_orbax_model_dir(out_dir / "best_model")


def _epoch_order(seed: int, epoch: int, n: int, batch_size: int):
    """The shuffled example order of `epoch`, wrapped around to whole batches."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(n)
    if len(order) % batch_size:  # wrap around: fixed batch shapes, every example seen
        extra = batch_size - len(order) % batch_size
        order = np.concatenate([order, np.resize(order, extra)])
    return order


def _truncate_history(path: Path, last_step: int) -> None:
    """Keep the evaluations up to `last_step` (those of the checkpoint resumed from)."""
    kept = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("step", 0) <= last_step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- run


def run(argv: list[str] | None = None) -> dict:
    """Fine-tune and evaluate as the command does; returns the best evaluation's metrics (the
    contents of eval_results.json). Stopped by SIGTERM / SIGINT it returns {"stopped_at": step,
    "signal": "SIGTERM", ...} (or the metrics plus "signal" when the signal came during the
    final export, which completes first)."""
    t_start = time.time()
    args = build_parser().parse_args(argv)
    from funnel_jax import preemption

    # SIGTERM / SIGINT only set a flag (funnel_jax/preemption.py), read during start-up, after
    # each training step, and once the final export is complete.
    stopper = preemption.PreemptionHandler().install()
    try:
        return _run(args, stopper, t_start)
    finally:
        stopper.uninstall()


def _run(args, stopper, t_start: float) -> dict:
    settings, preset_path = resolve_settings(args)
    if args.save_every < 0:
        raise ConfigError(f"save-every must be >= 0 (got {args.save_every})")
    if args.log_every < 1:
        raise ConfigError(f"log-every must be a positive integer (got {args.log_every})")
    if args.max_consecutive_skips < 1:
        raise ConfigError(
            f"max-consecutive-skips must be a positive integer (got {args.max_consecutive_skips})"
        )

    from funnel_jax import preemption, validation
    from funnel_jax.tasks import get_task

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    task = get_task(
        args.task,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        labels=labels,
        max_qa_length=settings["max_qa_length"],
        doc_stride=settings["doc_stride"],
        max_query_length=settings["max_query_length"],
        max_answer_length=settings["max_answer_length"],
        n_best_size=settings["n_best_size"],
        null_score_diff_threshold=settings["null_score_diff_threshold"],
        skip_malformed=args.skip_malformed_lines,
    )
    # 1. All data is read and checked before any model work.
    train_examples, eval_examples, files = read_data(task, args)
    metric_name = settings["metric_for_best"] or task.main_metric

    def absolute(path):
        return None if path is None else str(Path(path).absolute())

    # What identifies the run (train_config.json; a restart must match it).
    run_key = {
        "task": task.name,
        "kind": task.kind,
        "model_class": task.model_class,
        "metric_for_best": metric_name,
        "preset": preset_path,
        "files": {k: absolute(v) for k, v in files.items()},
        "settings": settings,
        "source": {
            "init": absolute(args.init),
            "tokenizer": absolute(args.tokenizer),
            "model_config": (
                absolute(args.model_config)
                if args.model_config and Path(args.model_config).is_file()
                else args.model_config
            ),
        },
        "data_options": {
            "text_column": args.text_column,
            "text_pair_column": args.text_pair_column,
            "label_column": args.label_column,
            "labels": labels,
            "max_train_examples": args.max_train_examples,
            "max_eval_examples": args.max_eval_examples,
            "skip_malformed_lines": args.skip_malformed_lines,
        },
        "num_train_examples": len(train_examples),
        "num_eval_examples": {k: len(v) for k, v in eval_examples.items()},
    }
    if hasattr(task, "info"):
        run_key.update(task.info())

    out_dir = Path(args.output_dir)
    saved_info = _prepare_output_dir(out_dir, args.overwrite_output_dir)
    _check_same_run(out_dir, saved_info, run_key)
    resuming = saved_info is not None
    if resuming and _is_finished(out_dir):
        results = load_json_object(out_dir / "eval_results.json")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
        print(
            f"{out_dir}: this run has already finished; nothing to do ({shown}; model in "
            f"{out_dir / 'best_model'})"
        )
        return results
    if stopper.requested:
        print(f"{stopper.signal_name} received before training: stopped (nothing to save)")
        return {"stopped_at": None, "output_dir": str(out_dir), "signal": stopper.signal_name}

    import jax
    import numpy as np

    from funnel_jax.checkpoint import TrainCheckpointer, save_model_dir
    from funnel_jax.data import truncation_stride
    from funnel_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from funnel_jax.tasks import EncodeSettings
    from funnel_jax.train_state import TrainState, jit_train_step, make_train_step

    # 2. Tokenizer and model.
    tok_dir = out_dir / "tokenizer"
    init_candidates = resolve_init(args.init)[1] if args.init else []
    tokenizer, tok_source = load_tokenizer(
        args,
        init_candidates,
        lambda: task.texts(train_examples),
        settings["vocab_size"],
        saved=tok_dir if resuming else None,
    )
    trained_vocab = not args.tokenizer and not args.init
    rng = jax.random.PRNGKey(settings["seed"])
    init_rng, state_rng = jax.random.split(rng)
    module, params, model_source = build_model(
        task, settings, args, tokenizer, trained_vocab, init_rng
    )
    config = module.config
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
        )
    max_len = settings["max_seq_length"]
    if max_len < config.min_seq_len():
        raise ConfigError(
            f"max-seq-length {max_len} is below this model's minimum {config.min_seq_len()}"
        )

    # 3. Features.
    enc = EncodeSettings.create(tokenizer, max_len, tail_pad=truncation_stride(config) - 1)
    train_feats = task.featurize(tokenizer, enc, train_examples, train=True)
    eval_feats = {
        name: task.featurize(tokenizer, enc, exs, train=False)
        for name, exs in eval_examples.items()
    }
    n_train = len(train_feats)
    batch_size = settings["batch_size"]
    eval_bs = settings["eval_batch_size"] or batch_size
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    if settings["max_steps"] is not None:
        total_steps = settings["max_steps"]
    else:
        total_steps = settings["epochs"] * steps_per_epoch
    eval_every = settings["eval_every"] or steps_per_epoch

    train_info = {
        **run_key,
        "model": model_source,
        "tokenizer": tok_source,
        "num_train_features": n_train,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "config": config.to_dict(),
        "checkpointing": {
            "save_every": args.save_every,
            "directory": TRAIN_CHECKPOINTS,
            "keep": KEEP_TRAIN_CHECKPOINTS,
        },
    }
    _check_same_run(out_dir, saved_info, train_info)
    if not resuming or not _has_tokenizer(tok_dir):
        save_tokenizer_atomic(tokenizer, tok_dir)
    write_json_atomic(out_dir / "train_config.json", train_info)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    eval_sizes = ", ".join(f"{k or 'dev'} {len(v)}" for k, v in eval_examples.items())
    print(
        f"{task.describe()}: {len(train_examples)} train examples ({n_train} features), "
        f"{eval_sizes}; "
        f"model {model_source}, {n_params:,} parameters; tokenizer {tok_source}; "
        f"{total_steps} steps of batch {batch_size}, lr {settings['learning_rate']}"
    )

    # 4. Jitted functions.
    label_keys = task.label_keys
    train_keys = ("input_ids", "attention_mask", "token_type_ids", *label_keys)

    def loss_fn(p, batch, dropout_rng):
        out = module.apply(
            {"params": p}, **batch, deterministic=False, rngs={"dropout": dropout_rng}
        )
        return out.loss, {}

    @jax.jit
    def eval_fn(p, inputs):
        out = module.apply({"params": p}, **inputs, deterministic=True)
        return task.outputs(out)

    # 5. Evaluation and best-checkpoint bookkeeping. checkpoints/ holds the best parameters;
    # after each training checkpoint only the best of that checkpoint's bookkeeping is kept
    # there, so a restart always finds it (newer ones are made again by the replayed steps).
    preemption.remove_leftovers(out_dir, subdirs=("checkpoints", TRAIN_CHECKPOINTS))
    best_ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=None)
    history_path = out_dir / "eval_history.jsonl"
    best: dict[str, Any] = {"value": None, "metrics": None, "step": None, "epoch": None}
    in_eval = {"now": False}

    def keep_only_best() -> None:
        for s in best_ckpt.all_steps():
            if s != best["step"]:
                best_ckpt.delete(s)

    def evaluate(p, step: int, epoch: float) -> dict:
        in_eval["now"] = True
        t0 = time.time()
        all_metrics, all_preds = {}, {}
        for name, feats in eval_feats.items():
            outputs = predict(eval_fn, p, feats, eval_bs)
            scores, preds = task.evaluate(eval_examples[name], feats, outputs)
            suffix = f"_{name}" if name else ""
            all_metrics.update({f"{k}{suffix}": float(v) for k, v in scores.items()})
            all_preds[name] = preds
        if metric_name not in all_metrics:
            raise ConfigError(
                f"metric-for-best {metric_name!r} is not among this task's metrics "
                f"({', '.join(all_metrics)})"
            )
        value = all_metrics[metric_name]
        improved = _is_better(value, best["value"])
        with open(history_path, "a", encoding="utf-8") as f:
            row = {"step": step, "epoch": round(epoch, 4), **all_metrics}
            f.write(json.dumps(row) + "\n")
        if improved:
            best_ckpt.save(step, p, extra={"step": step, "epoch": epoch, metric_name: value})
            best.update(value=value, metrics=all_metrics, step=step, epoch=epoch)
            for name, preds in all_preds.items():
                stem = out_dir / (f"predictions_{name}" if name else "predictions")
                task.write_predictions(stem, eval_examples[name], preds)
            write_json_atomic(out_dir / "eval_results.json", all_metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in all_metrics.items() if not k.endswith("total"))
        print(
            f"eval step {step} (epoch {epoch:.2f}): {shown}"
            f"{' (best)' if improved else ''} [{time.time() - t0:.1f}s]",
            flush=True,
        )
        in_eval["now"] = False
        return all_metrics

    def stopped(step: int, what: str) -> dict:
        best_ckpt.close()
        print(
            f"{stopper.signal_name} received: {what}; rerun the same command to resume",
            flush=True,
        )
        out = {"stopped_at": step, "total_steps": total_steps, "output_dir": str(out_dir)}
        return {**out, "signal": stopper.signal_name}

    # 6. Train.
    train_time = 0.0
    if total_steps > 0:
        opt_cfg = OptimizerConfig(
            learning_rate=settings["learning_rate"],
            warmup_steps=settings["warmup_steps"],
            warmup_ratio=settings["warmup_ratio"],
            total_steps=total_steps,
            weight_decay=settings["weight_decay"],
            b1=settings["b1"],
            b2=settings["b2"],
            eps=settings["eps"],
            clip_norm=settings["clip_norm"],
            grad_accum_steps=settings["grad_accum_steps"],
            layerwise_lr_decay=settings["layerwise_lr_decay"],
        )
        tx = make_optimizer(opt_cfg)
        train_step = make_train_step(
            loss_fn,
            tx,
            grad_accum_steps=opt_cfg.grad_accum_steps,
            learning_rate_fn=learning_rate_schedule(opt_cfg),
        )
        state = TrainState.create(params, tx, state_rng)
        del params
        put_batch = _mesh_setup(args, module, state, batch_size)
        if put_batch is not None:  # several devices: shard state and batches by the rules
            put_batch, state_sh, batch_sh = put_batch
            state = jax.device_put(state, state_sh)
            step_fn = jit_train_step(train_step, shardings=(state_sh, batch_sh))
        else:
            put_batch = lambda b: b  # noqa: E731
            # Committed to the device like a restored state: both use one compiled step.
            state = jax.device_put(state, jax.devices()[0])
            step_fn = jit_train_step(train_step)

        # Resume: the train state, the data position and the best-metric bookkeeping.
        train_ckpt = TrainCheckpointer(out_dir / TRAIN_CHECKPOINTS, keep=KEEP_TRAIN_CHECKPOINTS)
        fingerprint = {
            "num_train_features": n_train,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "seed": settings["seed"],
        }
        start_step = train_ckpt.latest_step() if resuming else None
        last_eval_step = 0
        if start_step is not None:
            state, extra = train_ckpt.restore(start_step, state)
            position = extra.get("data", {})
            epoch_at, batch_at = divmod(start_step, steps_per_epoch)
            expected = {"epoch": epoch_at, "batch": batch_at}
            if position != {**expected, **fingerprint}:
                raise ConfigError(
                    f"the checkpoint of step {start_step} in {train_ckpt.directory} has the data "
                    f"position {position}, expected {expected | fingerprint}; use another "
                    "--output-dir or --overwrite-output-dir"
                )
            best.update(extra["best"])
            last_eval_step = int(extra["last_eval_step"])
            print(
                f"resuming from step {start_step} of {total_steps} (checkpoint in "
                f"{train_ckpt.directory}; epoch {position['epoch']}, batch {position['batch']}"
                f"; best {metric_name} so far {best['value']} at step {best['step']})",
                flush=True,
            )
        else:
            start_step = 0
        keep_only_best()
        if resuming:
            _truncate_history(history_path, last_eval_step)
        else:
            history_path.write_text("")

        def save_train_checkpoint(st, at: int) -> None:
            epoch_at, batch_at = divmod(at, steps_per_epoch)  # the next batch to take
            extra = {
                "step": at,
                "data": {"epoch": epoch_at, "batch": batch_at, **fingerprint},
                "best": best,
                "last_eval_step": last_eval_step,
            }
            with validation.checkpoint_write(train_ckpt.directory, at, train_ckpt.all_steps()):
                train_ckpt.save(at, st, extra=extra)
            train_ckpt.wait()
            keep_only_best()

        if stopper.requested:
            train_ckpt.close()
            return stopped(start_step, f"stopped before training at step {start_step}")
        # A checkpoint saved on a signal at an evaluation step: that evaluation is still due.
        due = start_step % eval_every == 0 or start_step == total_steps
        if start_step > last_eval_step and due:
            evaluate(state.params, start_step, start_step / steps_per_epoch)
            last_eval_step = start_step

        from tqdm import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=args.no_progress,
            dynamic_ncols=True,
            desc=task.name,
            unit="step",
        )
        arrays = {k: train_feats.arrays[k] for k in train_keys}
        skip_guard = validation.SkipGuard(
            args.max_consecutive_skips, setting="--max-consecutive-skips"
        )
        step, pending, seen, t_log = start_step, [], 0, time.time()
        order_epoch, order = None, None
        stop = False
        try:
            while step < total_steps and not stop:
                epoch, batch_index = divmod(step, steps_per_epoch)
                if order_epoch != epoch:
                    order = _epoch_order(settings["seed"], epoch, n_train, batch_size)
                    order_epoch = epoch
                idx = order[batch_index * batch_size : (batch_index + 1) * batch_size]
                batch = {k: v[idx] for k, v in arrays.items()}
                state, metrics = step_fn(state, put_batch(batch))
                step += 1
                stop = stopper.should_stop(step)
                seen += batch_size
                pending.append(metrics)
                bar.update(1)
                if step % args.log_every == 0 or step == total_steps or stop:
                    rows = jax.device_get(pending)
                    pending = []
                    skip_guard.update(step - len(rows) + 1, [r["skipped"] for r in rows])
                    now = time.time()
                    train_time += now - t_log
                    loss = float(np.mean([r["loss"] for r in rows]))
                    lr = float(rows[-1]["learning_rate"])
                    ex_s = seen / max(now - t_log, 1e-9)
                    bar.set_postfix(
                        loss=f"{loss:.4f}",
                        lr=f"{lr:.2e}",
                        ex_s=f"{ex_s:.1f}",
                        skipped=skip_guard.total,
                        refresh=False,
                    )
                    if args.no_progress:
                        skipped = f", skipped {skip_guard.total}" if skip_guard.total else ""
                        print(
                            f"step {step}/{total_steps}: loss {loss:.4f}, lr {lr:.2e}{skipped}",
                            flush=True,
                        )
                    seen, t_log = 0, now
                # On a signal the evaluation due at this step waits for the restart.
                if (step % eval_every == 0 or step == total_steps) and not stop:
                    evaluate(state.params, step, step / steps_per_epoch)
                    last_eval_step = step
                    t_log = time.time()
                if stop or step == total_steps or (args.save_every and step % args.save_every == 0):
                    save_train_checkpoint(state, step)
        except KeyboardInterrupt:  # a second Ctrl-C: save what is consistent, then stop
            bar.close()
            try:
                jax.block_until_ready(state)
                at = int(state.step)
                if at == step and not in_eval["now"] and train_ckpt.latest_step() != at:
                    save_train_checkpoint(state, at)
                print(f"\ninterrupted; the newest checkpoint is step {train_ckpt.latest_step()}")
            except Exception as e:  # noqa: BLE001
                print(f"\ninterrupted; no checkpoint written ({e})", file=sys.stderr)
            train_ckpt.close()
            best_ckpt.close()
            raise
        bar.close()
        train_ckpt.close()
        if stop:
            return stopped(step, f"checkpoint of step {step} saved")
        final_params = state.params
    else:
        history_path.write_text("")
        keep_only_best()
        evaluate(params, 0, 0.0)
        final_params = params

    # 7. Export the best parameters.
    best_ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), final_params)
    best_params, _ = best_ckpt.restore(best["step"], abstract)
    best_ckpt.close()
    tok_files = sorted(str(p) for p in tok_dir.iterdir() if p.is_file())
    save_model_dir(
        out_dir / "best_model", module, best_params, extra_files=tok_files, overwrite=True
    )
    results = dict(best["metrics"])
    write_json_atomic(out_dir / "eval_results.json", results)
    print(
        f"best {metric_name} {best['value']:.4f} at step {best['step']}; "
        f"model in {out_dir / 'best_model'}; {time.time() - t_start:.0f}s "
        f"({train_time:.0f}s training)",
        flush=True,
    )
    if stopper.requested:  # signalled during the final evaluation / export, which completed
        print(f"{stopper.signal_name} received: the run had finished; exiting as interrupted")
        return {**results, "signal": stopper.signal_name}
    return results


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
