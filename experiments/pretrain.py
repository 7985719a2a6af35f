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
--tokenizer names an existing one. Everything lands in --output-dir:

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
import copy
import dataclasses
import functools
import json
import math
import os
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
CONFIG_DIR = ROOT / "configs" / "pretrain"
MODEL_CONFIG_DIR = ROOT / "configs" / "models"
DEFAULT_CONFIG = "tiny"
DEFAULT_OUTPUT_DIR = "runs/pretrain"
SECTIONS = ("model", "objective", "optimizer", "data", "train")

DATA_DEFAULTS: dict[str, Any] = {
    "seq_len": 128,
    "batch_size": 16,
    "vocab_size": 6000,  # WordPiece vocabulary trained when no --tokenizer is given
    "lowercase": True,
    "random_next_prob": 0.5,
    "eval_fraction": 0.05,  # documents held out for evaluation
    "eval_batches": 8,
    # Data shards (None: one per process). Global batches depend only on this number, so a
    # run with num_shards=N gives the same batches on 1 process or on any divisor of N.
    "num_shards": None,
}
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 300,
    "seed": 0,
    "dtype": "float32",  # compute dtype: float32 or bfloat16 (params stay float32)
    "log_every": 10,
    "save_every": 100,
    "keep_checkpoints": 3,
    "eval_every": 0,  # 0: evaluate at the start and the end only
    "max_consecutive_skips": 10,  # stop after this many non-finite steps in a row
}
# Settings a restart may change without breaking the bit-identical resume.
RESTART_MAY_CHANGE = {
    ("train", "log_every"),
    ("train", "save_every"),
    ("train", "keep_checkpoints"),
    ("train", "eval_every"),
    ("train", "max_consecutive_skips"),
}


# --------------------------------------------------------------------------- arguments


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
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR)
    p.add_argument("--steps", type=int, default=None, help="train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (global)")
    p.add_argument("--seq-len", type=int, default=None, help="data.seq_len")
    p.add_argument("--save-every", type=int, default=None, help="train.save_every")
    p.add_argument("--seed", type=int, default=None, help="train.seed")
    p.add_argument("--objective", choices=["electra", "mlm"], default=None, help="objective.name")
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any setting, e.g. --set model.d_model=128 optimizer.learning_rate=5e-4",
    )
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1: the rest of the devices); default: "
        "data parallel over every device when there are several, none on one device",
    )
    p.add_argument("--coordinator-address", default=None, help="jax.distributed coordinator")
    p.add_argument("--num-processes", type=int, default=None, help="jax.distributed processes")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")
    p.add_argument(
        "--compile-cache",
        default=os.environ.get("FUNNEL_JAX_COMPILE_CACHE", "~/.cache/funnel_jax/xla"),
        help="JAX persistent compilation cache directory ('' to disable)",
    )
    return p.parse_args(argv)


def _strip_comments(d):
    if isinstance(d, dict):
        return {k: _strip_comments(v) for k, v in d.items() if not str(k).startswith("_")}
    return d


def resolve_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" or os.sep in name or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"pretraining config not found: {path}")
        return path
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FileNotFoundError(f"no pretraining config named {name!r}; have {names}")
    return path


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
        if section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {section!r}; expected {SECTIONS}")
        cfg.setdefault(section, {})[name] = _parse_value(value)
    return cfg


def load_run_config(args: argparse.Namespace) -> dict:
    """The settings of the run: file < --set < dedicated flags, checked and completed."""
    path = resolve_config_path(args.config)
    raw = _strip_comments(load_json_object(path))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
    cfg = apply_overrides(raw, args.set)
    flags = {
        ("train", "steps"): args.steps,
        ("data", "batch_size"): args.batch_size,
        ("data", "seq_len"): args.seq_len,
        ("train", "save_every"): args.save_every,
        ("train", "seed"): args.seed,
        ("objective", "name"): args.objective,
    }
    for (section, key), value in flags.items():
        if value is not None:
            cfg.setdefault(section, {})[key] = value
    for section in SECTIONS:
        cfg.setdefault(section, {})
    for section, defaults in (("data", DATA_DEFAULTS), ("train", TRAIN_DEFAULTS)):
        unknown = sorted(set(cfg[section]) - set(defaults))
        if unknown:
            raise ConfigError(
                f"unknown {section} setting(s) {unknown}; expected {sorted(defaults)}"
            )
        cfg[section] = {**defaults, **cfg[section]}
    # Model: an optional preset from configs/models/, then the fields given.
    model = dict(cfg["model"])
    preset = model.pop("preset", None)
    if preset is not None:
        preset_path = MODEL_CONFIG_DIR / f"{preset}.json"
        if not preset_path.is_file():
            names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
            raise ConfigError(f"model.preset {preset!r} not found in configs/models/ ({names})")
        base = load_json_object(preset_path)
        for k in ("architectures", "model_type", "tie_word_embeddings"):
            base.pop(k, None)
        if "block_sizes" in model and "block_repeats" not in model:
            base.pop("block_repeats", None)  # the preset's repeats fit the preset's blocks
        model = {**base, **model}
    cfg["model"] = model
    _check_config(cfg)
    from funnel_jax import validation

    validation.check_pretrain_settings(cfg)  # cross-section contradictions
    cfg["_config_file"] = str(path)
    return cfg


def _check_config(cfg: dict) -> None:
    from funnel_jax.config import FunnelConfig
    from funnel_jax.electra import ObjectiveConfig
    from funnel_jax.optim import OptimizerConfig

    names = {f.name for f in dataclasses.fields(FunnelConfig)}
    unknown = sorted(set(cfg["model"]) - names)
    if unknown:
        raise ConfigError(f"unknown model setting(s) {unknown} (FunnelConfig has no such field)")
    FunnelConfig.from_dict({**cfg["model"], "vocab_size": cfg["model"].get("vocab_size", 30522)})
    ObjectiveConfig.from_dict(cfg["objective"])
    OptimizerConfig.from_dict(cfg["optimizer"])
    data, train = cfg["data"], cfg["train"]
    for section, key in (
        ("data", "seq_len"),
        ("data", "batch_size"),
        ("data", "vocab_size"),
        ("data", "eval_batches"),
        ("train", "steps"),
        ("train", "log_every"),
        ("train", "save_every"),
        ("train", "keep_checkpoints"),
    ):
        value = cfg[section][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{section}.{key} must be a positive integer, got {value!r}")
    if isinstance(train["seed"], bool) or not isinstance(train["seed"], int):
        raise ConfigError(f"train.seed must be an integer, got {train['seed']!r}")
    if not isinstance(train["eval_every"], int) or train["eval_every"] < 0:
        raise ConfigError(f"train.eval_every must be an integer >= 0, got {train['eval_every']!r}")
    if train["dtype"] not in ("float32", "bfloat16"):
        raise ConfigError(f"train.dtype must be 'float32' or 'bfloat16', got {train['dtype']!r}")
    if not 0.0 < data["eval_fraction"] < 1.0:
        raise ConfigError(f"data.eval_fraction must be in (0, 1), got {data['eval_fraction']!r}")
    accum = cfg["optimizer"].get("grad_accum_steps", 1)
    if data["batch_size"] % accum:
        raise ConfigError(
            f"data.batch_size={data['batch_size']} must be a multiple of "
            f"optimizer.grad_accum_steps={accum}"
        )


def _comparable(cfg: dict) -> dict:
    out = {}
    for section in SECTIONS:
        out[section] = {
            k: v for k, v in cfg[section].items() if (section, k) not in RESTART_MAY_CHANGE
        }
    out["corpus"] = cfg.get("corpus")
    out["tokenizer"] = cfg.get("tokenizer")
    return out


def _config_diff(saved: dict, now: dict) -> list[str]:
    a, b = _comparable(saved), _comparable(now)
    diffs = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section), b.get(section)
        if isinstance(sa, dict) and isinstance(sb, dict):
            for k in sorted(set(sa) | set(sb)):
                if sa.get(k) != sb.get(k):
                    diffs.append(f"{section}.{k}: saved {sa.get(k)!r}, now {sb.get(k)!r}")
        elif sa != sb:
            diffs.append(f"{section}: saved {sa!r}, now {sb!r}")
    return diffs


# --------------------------------------------------------------------------- helpers


def _is_main() -> bool:
    """Process 0 writes logs, plots and exports (every process saves checkpoints)."""
    return "jax" not in sys.modules or sys.modules["jax"].process_index() == 0


class _NullLog:
    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _write_json(path: Path, obj) -> None:
    if _is_main():
        write_json_atomic(path, obj)


def _get_tokenizer(cfg: dict, args, out_dir: Path, documents_fn):
    from funnel_jax.tokenizer import FunnelTokenizer

    tok_dir = out_dir / "tokenizer"
    if args.tokenizer:
        src = Path(args.tokenizer)
        if not src.is_dir():
            raise FileNotFoundError(f"--tokenizer directory not found: {src}")
        tok = FunnelTokenizer.from_pretrained(src)
        if not (tok_dir / "tokenizer.json").is_file() and _is_main():
            save_tokenizer_atomic(tok, tok_dir)
        return tok, tok_dir, False
    if (tok_dir / "tokenizer.json").is_file():
        return FunnelTokenizer.from_pretrained(tok_dir), tok_dir, False
    import jax

    if jax.process_count() > 1:
        # Training a vocabulary is not bit-reproducible (tokenizers' trainer): process 0 trains
        # it, the others wait and read the same files (a shared output directory).
        from jax.experimental import multihost_utils

        if _is_main():
            save_tokenizer_atomic(_train_tokenizer(cfg, documents_fn()), tok_dir)
        multihost_utils.sync_global_devices("funnel_jax tokenizer")
        return FunnelTokenizer.from_pretrained(tok_dir), tok_dir, True
    tok = _train_tokenizer(cfg, documents_fn())
    save_tokenizer_atomic(tok, tok_dir)
    return tok, tok_dir, True


def _train_tokenizer(cfg: dict, docs):
    from funnel_jax.tokenizer import FunnelTokenizer

    return FunnelTokenizer.train(
        iter(docs), vocab_size=cfg["data"]["vocab_size"], lowercase=cfg["data"]["lowercase"]
    )


def resolve_settings(cfg: dict, tok):
    """(FunnelConfig, ObjectiveConfig, OptimizerConfig, total_steps) of a run config; the
    model's vocab_size defaults to the tokenizer's size."""
    from funnel_jax.config import FunnelConfig
    from funnel_jax.electra import ObjectiveConfig
    from funnel_jax.optim import OptimizerConfig

    model_fields = dict(cfg["model"])
    vocab = model_fields.get("vocab_size")
    if vocab is None:
        model_fields["vocab_size"] = len(tok)
    elif vocab < len(tok):
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {len(tok)}")
    model_cfg = FunnelConfig.from_dict(model_fields)
    if cfg["data"]["seq_len"] < model_cfg.min_seq_len():
        raise ConfigError(
            f"data.seq_len={cfg['data']['seq_len']} is too short: this model needs at least "
            f"{model_cfg.min_seq_len()} tokens to pool in every block"
        )
    objective_cfg = ObjectiveConfig.from_dict(cfg["objective"])
    opt_cfg = OptimizerConfig.from_dict(cfg["optimizer"])
    total_steps = opt_cfg.total_steps or cfg["train"]["steps"]
    return model_cfg, objective_cfg, opt_cfg, total_steps


def build_from_output_dir(output_dir: str | os.PathLike):
    """(objective, optimizer, tokenizer, run config) of the run in `output_dir`."""
    from funnel_jax.data import SpecialIds
    from funnel_jax.tokenizer import FunnelTokenizer

    out = Path(output_dir)
    cfg = load_json_object(out / "run_config.json")
    tok = FunnelTokenizer.from_pretrained(out / "tokenizer")
    model_cfg, objective_cfg, opt_cfg, total_steps = resolve_settings(cfg, tok)
    objective, tx, *_ = _build(
        model_cfg,
        objective_cfg,
        opt_cfg,
        SpecialIds.from_tokenizer(tok),
        cfg["data"]["seq_len"],
        cfg["train"]["dtype"],
        total_steps,
    )
    return objective, tx, tok, cfg


def restore_state(output_dir: str | os.PathLike, step: int | None = None):
    """(TrainState, extra) of a checkpoint of the run in `output_dir` (default: the newest):
    generator and discriminator params, optimizer state, step and RNG."""
    from funnel_jax.checkpoint import TrainCheckpointer
    from funnel_jax.train_state import abstract_train_state

    objective, tx, _, cfg = build_from_output_dir(output_dir)
    ckpt = TrainCheckpointer(
        Path(output_dir) / "checkpoints", keep=cfg["train"]["keep_checkpoints"]
    )
    try:
        return ckpt.restore(step, abstract_train_state(objective.abstract_params(), tx))
    finally:
        ckpt.close()


@functools.lru_cache(maxsize=4)
def _build(model_cfg, objective_cfg, opt_cfg, special, seq_len, dtype_name, total_steps):
    """Objective, optimizer and the jitted functions; cached so that runs in one process with
    the same settings (tests, restarts) reuse the compiled code."""
    import jax
    import jax.numpy as jnp

    from funnel_jax.electra import make_objective
    from funnel_jax.optim import learning_rate_schedule, make_optimizer
    from funnel_jax.train_state import TrainState, jit_train_step, make_train_step

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    objective = make_objective(model_cfg, objective_cfg, special, seq_len, dtype=dtype)
    tx = make_optimizer(opt_cfg, total_steps)
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    step_fn = make_train_step(
        objective.loss, tx, grad_accum_steps=opt_cfg.grad_accum_steps, learning_rate_fn=schedule
    )
    train_step = jit_train_step(step_fn)
    eval_step = jax.jit(objective.eval_step)

    @jax.jit
    def init_state(key):
        k_init, k_train = jax.random.split(key)
        return TrainState.create(objective.init(k_init), tx, k_train)

    return objective, tx, train_step, eval_step, init_state, step_fn


def _mean_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for k in rows[0]:
        vals = [float(r[k]) for r in rows]
        out[k] = sum(vals) if k == "skipped" else sum(vals) / len(vals)
    return out


class MetricsLog:
    """metrics.jsonl + TensorBoard; a restart drops the lines written after its checkpoint."""

    def __init__(self, out_dir: Path, start_step: int, final_step: int):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    step = row.get("step", 0)
                    end_eval = row.get("split") == "eval" and step == final_step and step > 0
                    if step <= start_step and not end_eval:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 or None)
        except ImportError:  # pragma: no cover
            print("warning: tensorboardX not installed; no TensorBoard events", file=sys.stderr)
            self.tb = None

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        row = {"step": int(step), "split": split, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def plot_losses(metrics_path: Path, png_path: Path, objective: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    panels = [("loss", "total loss"), ("mlm_loss", "MLM loss"), ("mlm_acc", "MLM accuracy")]
    if objective == "electra":
        panels += [("disc_loss", "discriminator loss"), ("disc_acc", "RTD accuracy")]
        panels += [("rtd_auc", "RTD AUC (eval)")]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        xs = [r["step"] for r in train if key in r]
        if xs:
            ax.plot(xs, [r[key] for r in train if key in r], label="train", lw=1)
        ex = [r["step"] for r in evals if key in r]
        if ex:
            ax.plot(ex, [r[key] for r in evals if key in r], "o-", label="eval", ms=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if xs or ex:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


SUMMARY_ROWS = (
    ("mlm_loss", "generator MLM loss", "{:.3f}"),
    ("mlm_acc", "generator MLM accuracy", "{:.3f}"),
    ("disc_loss", "discriminator loss", "{:.4f}"),
    ("disc_acc", "RTD accuracy", "{:.3f}"),
    ("rtd_auc", "RTD AUC", "{:.3f}"),
    ("replaced_frac", "replaced tokens", "{:.3f}"),
)


def format_summary(summary: dict) -> str:
    start, end = summary["start"], summary["end"]
    lines = [f"{'held-out eval':<26}{'step 0':>10}{'step ' + str(summary['steps']):>12}"]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in SUMMARY_ROWS:
        if key not in end:
            continue
        if summary["objective"] == "mlm" and key.startswith("mlm"):
            label = label.replace("generator ", "")
        lines.append(
            f"{label:<26}{fmt.format(start.get(key, float('nan'))):>10}{fmt.format(end[key]):>12}"
        )
    lines.append("-" * len(lines[0]))
    took = f"{summary['wall_time_s']:.0f} s"
    if summary.get("resumed_from"):
        took += f" (since the resume at step {summary['resumed_from']})"
    lines.append(
        f"took {took}, {summary.get('tokens_per_s', 0):.0f} tokens/s in training; "
        f"final model in {summary['final_dir']}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the run


def run(argv: list[str] | None = None) -> dict:
    """Run (or resume) a pretraining job; returns the summary dict (see module docstring).

    With --stop-after K < steps it returns {"stopped_at": K, ...} after saving a checkpoint.
    On SIGTERM / SIGINT it returns {"stopped_at": step, "signal": "SIGTERM", ...} (a summary with
    "signal" when the signal came during the final evaluation and export, which completes).
    """
    t_start = time.time()
    args = parse_args(argv)
    from funnel_jax import preemption

    # SIGTERM / SIGINT from the start on only set a flag (funnel_jax/preemption.py), read before
    # training, after each step, and once the final export is complete. (Only process 0 prints
    # once jax.distributed is up: asking JAX before that would start its backend too early.)
    stopper = preemption.PreemptionHandler().install()
    try:
        return _run(args, stopper, t_start)
    finally:
        stopper.uninstall()


def _run(args: argparse.Namespace, stopper, t_start: float) -> dict:
    from funnel_jax import sharding

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    cfg = load_run_config(args)
    stopper.sync_every = cfg["train"]["log_every"]
    cfg["corpus"] = [str(Path(p).absolute()) for p in args.corpus] if args.corpus else None
    cfg["tokenizer"] = str(Path(args.tokenizer).absolute()) if args.tokenizer else None
    out_dir = Path(args.output_dir)
    from funnel_jax import preemption, validation

    validation.check_output_dir(out_dir)  # created, and writable

    run_config_path = out_dir / "run_config.json"
    if run_config_path.exists():
        saved = load_json_object(run_config_path)
        diffs = _config_diff(saved, cfg)
        if diffs:
            raise ConfigError(
                f"{out_dir} holds a run with other settings ({'; '.join(diffs)}); use another "
                "--output-dir or the same settings"
            )
    summary_path = out_dir / "summary.json"
    if summary_path.exists() and (out_dir / "final").is_dir():
        summary = load_json_object(summary_path)
        print(f"{out_dir}: this run has already finished; nothing to do.")
        print(format_summary(summary))
        return {**summary, "already_finished": True}
    _write_json(run_config_path, cfg)

    from funnel_jax.runtime import enable_compile_cache

    enable_compile_cache(args.compile_cache)
    import flax.linen as nn
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from funnel_jax import data as data_lib
    from funnel_jax.checkpoint import TrainCheckpointer, save_model_dir
    from funnel_jax.electra import evaluate
    from funnel_jax.train_state import abstract_train_state, jit_train_step

    is_main = jax.process_index() == 0
    stopper.verbose = is_main
    dcfg, tcfg = cfg["data"], cfg["train"]
    steps, seed = tcfg["steps"], tcfg["seed"]
    stop_at = steps if args.stop_after is None else min(args.stop_after, steps)
    if stop_at < 0:
        raise ConfigError(f"--stop-after must be >= 0, got {args.stop_after}")

    # Corpus and tokenizer.
    @functools.lru_cache(maxsize=1)
    def documents():
        if cfg["corpus"]:
            return data_lib.read_corpus(cfg["corpus"])
        return data_lib.stdlib_corpus()

    tok, tok_dir, trained = _get_tokenizer(cfg, args, out_dir, documents)
    special = data_lib.SpecialIds.from_tokenizer(tok)
    model_cfg, objective_cfg, opt_cfg, total_steps = resolve_settings(cfg, tok)
    seq_len, batch_size = dcfg["seq_len"], dcfg["batch_size"]

    # Held-out documents; the data is split into data.num_shards shards (default: one per
    # process) and this process tokenizes and packs only its own shards (data.ShardedBatches).
    train_raw, eval_raw = data_lib.split_documents(documents(), dcfg["eval_fraction"], seed=0)
    if not eval_raw:
        raise ConfigError("the corpus has a single document; it cannot hold out an eval set")
    pi, pc = jax.process_index(), jax.process_count()
    num_shards = int(dcfg.get("num_shards") or pc)

    def shard_docs(raw):
        def docs(s):
            out = data_lib.tokenize_documents(
                tok, raw[s::num_shards], vocab_size=model_cfg.vocab_size
            )
            if not out:
                raise ConfigError(f"data shard {s} of {num_shards} got no text after tokenization")
            return out

        return docs

    pack_kw = dict(
        seq_len=seq_len,
        special=special,
        truncate_stride=data_lib.truncation_stride(model_cfg),
        random_next_prob=dcfg["random_next_prob"],
        num_shards=num_shards,
        global_batch=batch_size,
        process_index=pi,
        process_count=pc,
    )
    try:
        train_data = data_lib.ShardedBatches(shard_docs(train_raw), seed=seed, **pack_kw)
        eval_data = data_lib.ShardedBatches(
            shard_docs(eval_raw), seed=12345, shuffle=False, **pack_kw
        )
        eval_batches = eval_data.take(dcfg["eval_batches"])
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(
            f"{e}; for the held-out set raise data.eval_fraction or lower data.batch_size"
        ) from None

    objective, tx, train_step, eval_step, init_state, step_fn = _build(
        model_cfg, objective_cfg, opt_cfg, special, seq_len, tcfg["dtype"], total_steps
    )
    eval_rng = jax.random.PRNGKey(seed + 1)

    # Device mesh: none on a single device (plain jit); otherwise params, optimizer state and
    # batches are sharded by the logical-axis rules (funnel_jax/sharding.py).
    mesh = None
    if args.mesh or jax.device_count() > 1:
        mesh = sharding.make_mesh(args.mesh)
        sharding.check_divisible(batch_size, mesh)
        boxed = jax.eval_shape(lambda: objective.init(jax.random.PRNGKey(0), unbox=False))
        params_sh = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
        abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(seed))
        state_sh = sharding.tree_shardings_like_params(abstract_state, params_sh, mesh)
        with sharding.use_mesh(mesh):
            train_step = jit_train_step(
                step_fn, shardings=(state_sh, sharding.batch_sharding(mesh))
            )
            replicated = NamedSharding(mesh, PartitionSpec())
            eval_step = jax.jit(objective.eval_step, out_shardings=replicated)
        eval_batches = [sharding.shard_batch(b, mesh) for b in eval_batches]
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {pc} process(es)")

    def put_batch(b):
        return b if mesh is None else sharding.shard_batch(b, mesh)

    if is_main:  # unfinished checkpoint / export dirs of a killed run (never read anyway)
        preemption.remove_leftovers(out_dir)
    ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=tcfg["keep_checkpoints"])
    start_step = ckpt.latest_step()

    def stopped_before_training(at: int) -> dict:
        """A signal during start-up: nothing new to save (the state is step 0 or restored)."""
        ckpt.close()
        if is_main:
            print(
                f"{stopper.signal_name} received before training: stopped at step {at} (nothing "
                "new to save); rerun the command to resume"
            )
        stopped = {"stopped_at": at, "steps": steps, "output_dir": str(out_dir)}
        return {**stopped, "signal": stopper.signal_name}

    if pc == 1 and stopper.requested:  # (several processes: they agree at the check below)
        return stopped_before_training(start_step or 0)
    if start_step is not None:
        abstract = abstract_train_state(objective.abstract_params(), tx)
        if mesh is not None:
            abstract = jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                abstract,
                state_sh,
            )
        state, extra = ckpt.restore(start_step, abstract)
        train_data.restore(extra["data"])
        if is_main:
            print(f"resuming from the checkpoint of step {start_step} in {out_dir / 'checkpoints'}")
    elif mesh is not None:
        with sharding.use_mesh(mesh):
            state = jax.jit(init_state, out_shardings=state_sh)(jax.random.PRNGKey(seed))
    else:
        # Committed to the device like a restored state, so that both use one compiled step.
        state = jax.device_put(init_state(jax.random.PRNGKey(seed)), jax.devices()[0])
    start_step = int(state.step)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    export_module, export_params = objective.export(state.params)
    n_export = int(sum(np.prod(x.shape) for x in jax.tree.leaves(export_params)))
    del export_params

    log = MetricsLog(out_dir, start_step, steps) if is_main else _NullLog()
    start_eval_path = out_dir / "eval_start.json"
    if start_eval_path.exists():
        start_metrics = load_json_object(start_eval_path)
    else:
        start_metrics = evaluate(eval_step, state.params, eval_batches, eval_rng)
        _write_json(start_eval_path, start_metrics)
        log.write(0, "eval", start_metrics)

    print(
        f"{objective.name} pretraining: {n_params:,} parameters ({type(export_module).__name__} "
        f"{n_export:,}), vocab {model_cfg.vocab_size}"
        f"{' (trained)' if trained else ''}, seq {seq_len}, batch {batch_size}, "
        f"{train_data.num_tokens:,} train tokens, steps {start_step}->{stop_at} of {steps}"
    )

    if stopper.should_stop(start_step):  # a collective on several processes: all stop here
        log.close()
        return stopped_before_training(start_step)

    def save_checkpoint(st):
        with validation.checkpoint_write(ckpt.directory, int(st.step), ckpt.all_steps()):
            ckpt.save(int(st.step), st, extra={"data": train_data.state(), "step": int(st.step)})

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        initial=start_step,
        disable=args.no_progress or not is_main,
        dynamic_ncols=True,
        desc=objective.name,
        unit="step",
    )
    pending: list = []
    # SIGTERM/SIGINT: stop after the step in flight, with a checkpoint (funnel_jax/preemption.py)
    skip_guard = validation.SkipGuard(tcfg["max_consecutive_skips"])
    tokens_since, t_log = 0, time.time()
    train_tokens, train_time, compile_s = 0, 0.0, 0.0
    step = start_step
    try:
        while step < stop_at:
            batch = next(train_data)
            tokens_since += int(batch["attention_mask"].sum()) * pc
            state, metrics = train_step(state, put_batch(batch))
            step += 1
            stop = stopper.should_stop(step)
            pending.append(metrics)
            bar.update(1)
            if step == start_step + 1:  # keep the compilation out of tokens/s
                jax.block_until_ready(metrics)
                compile_s = time.time() - t_log
                tokens_since, t_log = 0, time.time()
            if step % tcfg["log_every"] == 0 or step == stop_at or stop:
                rows = jax.device_get(pending)
                pending = []
                skip_guard.update(step - len(rows) + 1, [r["skipped"] for r in rows])
                mean = _mean_metrics(rows)
                now = time.time()
                if tokens_since:  # (none when only the first, compiling step ran)
                    mean["tokens_per_s"] = tokens_since / max(now - t_log, 1e-9)
                    train_tokens += tokens_since
                    train_time += now - t_log
                tokens_since, t_log = 0, now
                log.write(step, "train", mean)
                post = {"loss": f"{mean['loss']:.3f}", "mlm": f"{mean['mlm_loss']:.3f}"}
                if "disc_loss" in mean:
                    post["disc"] = f"{mean['disc_loss']:.4f}"
                    post["rtd_acc"] = f"{mean['disc_acc']:.3f}"
                if "tokens_per_s" in mean:
                    post["tok/s"] = f"{mean['tokens_per_s']:.0f}"
                bar.set_postfix(post, refresh=False)
            do_eval = tcfg["eval_every"] and step % tcfg["eval_every"] == 0 and step < steps
            do_save = step % tcfg["save_every"] == 0 and step < stop_at
            if do_eval or do_save:
                jax.block_until_ready(state)  # the training time ends here ...
                t_pause = time.time()
                if do_eval:
                    metrics_eval = evaluate(eval_step, state.params, eval_batches, eval_rng)
                    log.write(step, "eval", metrics_eval)
                if do_save:
                    save_checkpoint(state)
                t_log += time.time() - t_pause  # ... and the pause stays out of tokens/s
            if stop:  # the checkpoint of `step` is saved below
                break
    except KeyboardInterrupt:
        bar.close()
        try:  # `state` is the last completed step's (unless the interrupt hit mid-dispatch)
            if pending:
                log.write(step, "train", _mean_metrics(jax.device_get(pending)))
            jax.block_until_ready(state)
            if ckpt.latest_step() != int(state.step):
                save_checkpoint(state)
            ckpt.wait()
            print(f"\ninterrupted: checkpoint of step {int(state.step)} saved; rerun to resume")
        except Exception as e:  # noqa: BLE001
            print(f"\ninterrupted; no checkpoint written ({e}); rerun to resume", file=sys.stderr)
        log.close()
        raise
    bar.close()

    if ckpt.latest_step() != step:
        save_checkpoint(state)
    ckpt.wait()
    if step < steps:
        log.close()
        ckpt.close()
        print(f"stopped after step {step} of {steps}; rerun the command to resume")
        stopped = {"stopped_at": step, "steps": steps, "output_dir": str(out_dir)}
        return {**stopped, "signal": stopper.signal_name}  # signal: None, "SIGTERM", "SIGINT"

    end_metrics = evaluate(eval_step, state.params, eval_batches, eval_rng)
    log.write(step, "eval", end_metrics)
    log.close()
    ckpt.close()

    module, export_params = objective.export(state.params)
    tok_files = sorted(str(p) for p in tok_dir.iterdir() if p.is_file())
    if pc == 1:
        save_model_dir(
            out_dir / "final", module, export_params, extra_files=tok_files, overwrite=True
        )
    else:
        _export_multiprocess(out_dir / "final", module, export_params, tok_files)
    if is_main:
        plot_losses(out_dir / "metrics.jsonl", out_dir / "loss_curves.png", objective.name)

    summary = {
        "objective": objective.name,
        "steps": steps,
        "start": start_metrics,
        "end": end_metrics,
        "resumed_from": start_step if start_step > 0 else None,
        "wall_time_s": time.time() - t_start,
        "train_time_s": train_time,
        "first_step_s": compile_s,
        "tokens_per_s": train_tokens / train_time if train_time > 0 else 0.0,
        "num_params": n_params,
        "num_params_exported": n_export,
        "final_dir": str(out_dir / "final"),
        "output_dir": str(out_dir),
        "backend": jax.default_backend(),
    }
    _write_json(summary_path, summary)
    print(format_summary(summary))
    if stopper.requested:  # signalled during the final evaluation / export, which completed
        if is_main:
            print(f"{stopper.signal_name} received: the run had finished; exiting as interrupted")
        return {**summary, "signal": stopper.signal_name}
    return summary


def _export_multiprocess(final_dir: Path, module, params, extra_files) -> None:
    """Gather the sharded parameters from every process; process 0 writes a save_pretrained
    directory (config.json + model.safetensors, which from_pretrained loads) atomically."""
    import shutil

    from jax.experimental import multihost_utils

    from funnel_jax.weights import save_pretrained

    host_params = multihost_utils.process_allgather(params, tiled=True)
    if _is_main():
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(module, host_params, tmp)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(tmp, final_dir)
    multihost_utils.sync_global_devices("funnel_jax final export")


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
