"""Fine-tuning as a library call: `funnel_jax.finetune(config, workdir)`.

    import funnel_jax as fj
    from funnel_jax.training import FinetuneDataConfig, FinetuneModelConfig
    cfg = fj.training.load_finetune_config(
        "sst2", {"max_steps": 20}, data=FinetuneDataConfig(data_dir="glue/SST-2"),
        model=FinetuneModelConfig(init="runs/tiny"))
    results = fj.finetune(cfg, "runs/sst2")          # eval_results.json

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
tokenizer/. `python -m experiments.finetune` is the command over this function.

Resuming: OUTPUT_DIR/train_checkpoints holds Orbax training checkpoints (params, optimizer
state, step, dropout RNG, the position in the shuffled data, the best-metric bookkeeping) every
loop.save_every (--save-every) steps and at the end. Running again on OUTPUT_DIR resumes from
the newest complete one and ends bit-identical (CPU) to an uninterrupted run; a finished run is
left as it is; other settings are refused, naming the field (train_config.json). SIGTERM /
SIGINT save a checkpoint of the step reached and exit with status 143 / 130.

The step loop is funnel_jax.training.loop.fit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from funnel_jax.training import presets
from funnel_jax.training.config import (
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneLoopConfig,
    FinetuneModelConfig,
    config_diff,
)
from funnel_jax.training.files import (
    ConfigError,
    load_json_object,
    save_tokenizer_atomic,
    write_json_atomic,
)
from funnel_jax.training.saves import TrainingSaves

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

TRAIN_CHECKPOINTS = "train_checkpoints"  # resume checkpoints; "checkpoints": the best params
KEEP_TRAIN_CHECKPOINTS = 2
# train_config.json entries a restart may change besides the `loop` settings (which are not
# recorded there, FinetuneLoopConfig marks them): the checkpoint interval, and descriptions of
# the model / tokenizer source with paths as typed (the absolute paths are under "source").
RESTART_MAY_CHANGE = ("checkpointing", "model", "tokenizer")


# --------------------------------------------------------------------------- settings


def load_preset(task: str, preset: str | None) -> tuple[dict, str | None]:
    """(settings, path) of the preset: `preset` (a file or a name in configs/finetune/), else
    configs/finetune/TASK.json if any."""
    if preset:
        path = Path(preset)
        if not path.is_file():
            path = presets.preset_path("finetune", preset) or path
        if not path.is_file():
            raise ConfigError(
                f"preset not found: {preset} (a file or a name in {presets.preset_dir('finetune')})"
            )
    else:
        path = presets.preset_path("finetune", task)
        if path is None:
            return {}, None
    d = load_json_object(path)
    settings = {k: v for k, v in d.items() if not k.startswith("_") and k != "task"}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    return settings, str(path)


def resolve_settings(
    task: str, preset: str | None, given: Mapping[str, Any]
) -> tuple[dict, str | None]:
    """(hyper-parameters, preset path): DEFAULTS < the preset < `given` (None values ignored)."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    preset_values, preset_path = load_preset(task, preset)
    settings = {**DEFAULTS, **preset_values, **given}
    # A length in epochs (warm-up as a ratio) given replaces the preset's steps; a preset's
    # warm-up in steps keeps its share of the run when what is given changes the length.
    if "epochs" in given and "max_steps" not in given:
        settings["max_steps"] = None
    length_changed = "epochs" in given or "max_steps" in given
    warmup_given = "warmup_ratio" in given or "warmup_steps" in given
    if length_changed and not warmup_given and preset_values.get("warmup_steps"):
        if preset_values.get("max_steps"):
            settings["warmup_ratio"] = preset_values["warmup_steps"] / preset_values["max_steps"]
        settings["warmup_steps"] = 0
    if "warmup_ratio" in given and "warmup_steps" not in given:
        settings["warmup_steps"] = 0
    _check_settings(settings)
    return settings, preset_path


def load_finetune_config(
    task: str,
    given: Mapping[str, Any] | None = None,
    *,
    preset: str | None = None,
    data: FinetuneDataConfig | None = None,
    model: FinetuneModelConfig | None = None,
    loop: FinetuneLoopConfig | None = None,
    mesh: str | None = None,
    overwrite_output_dir: bool = False,
) -> FinetuneConfig:
    """A checked FinetuneConfig: the hyper-parameters resolved from DEFAULTS < the task's
    preset (or `preset`) < `given`."""
    settings, preset_path = resolve_settings(task, preset, given or {})
    cfg = FinetuneConfig(
        task=task,
        settings=settings,
        data=data or FinetuneDataConfig(),
        model=model or FinetuneModelConfig(),
        loop=loop or FinetuneLoopConfig(),
        preset=preset_path,
        mesh=mesh,
        overwrite_output_dir=overwrite_output_dir,
    )
    cfg.loop.check()
    return cfg


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


def read_data(task, data: FinetuneDataConfig) -> tuple[list, dict[str, list], dict[str, Path]]:
    """Read and check every file before anything else happens (DataError names file:line)."""
    from funnel_jax.tasks import DataError

    if data.train_file:
        train_path = Path(data.train_file)
    elif data.data_dir:
        train_path = task.train_file(data.data_dir)
    else:
        raise ConfigError("give --data-dir or --train-file")
    if data.dev_file:
        eval_paths = {"": Path(data.dev_file)}
    elif data.data_dir:
        eval_paths = task.eval_files(data.data_dir)
    else:
        raise ConfigError("give --data-dir or --dev-file")
    for path in [train_path, *eval_paths.values()]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data file not found: {path}")
    train = _limit(task.read(train_path), data.max_train_examples)
    evals = {name: _limit(task.read(p), data.max_eval_examples) for name, p in eval_paths.items()}
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
    tokenizer/), a model directory, or a Hub id (ORG/NAME, resolved through the local cache
    or a download: funnel_jax/hub.py)."""
    from funnel_jax import hub

    p = Path(path)
    if not p.exists():
        if not hub.looks_like_repo_id(str(path)):
            raise FileNotFoundError(f"--init: no such directory: {p}")
        p = hub.resolve_model_dir(str(path), tokenizer=True)
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
    model: FinetuneModelConfig,
    init_candidates: list[Path],
    texts_fn,
    vocab_size: int,
    saved: Path | None = None,
):
    """(tokenizer, how it was found). `saved`: the tokenizer directory of the run being resumed,
    used instead of training a vocabulary again (training is not bit-reproducible)."""
    from funnel_jax.tokenizer import FunnelTokenizer

    if model.tokenizer:
        t = Path(model.tokenizer)
        if t.is_file():
            return FunnelTokenizer.from_vocab(t), f"vocabulary {t}"
        if not t.exists():
            from funnel_jax import hub

            if not hub.looks_like_repo_id(str(model.tokenizer)):
                raise FileNotFoundError(f"--tokenizer: no such file or directory: {t}")
            t = hub.resolve_tokenizer_dir(str(model.tokenizer))
            return FunnelTokenizer.from_pretrained(t), f"{model.tokenizer} ({t})"
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
        path = presets.preset_path("models", name) or Path(name)
    if not path.is_file():
        known = presets.preset_names("models")
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


def _load_on_host(model_dir: Path, cls):
    """(module, params as numpy) of a model directory, read without any device holding the
    parameters (Orbax: straight into numpy; other formats: converted on the CPU backend)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from funnel_jax import checkpoint, from_pretrained

    if checkpoint.is_orbax_model_dir(model_dir):
        return checkpoint.load_model_dir(model_dir, model_class=cls, dtype=jnp.float32, host=True)
    with checkpoint.host_device():
        module, params = from_pretrained(model_dir, model_class=cls, dtype=jnp.float32)
    return module, jax.tree.map(np.asarray, params)


def build_model(task, settings, source: FinetuneModelConfig, tokenizer, trained_vocab: bool):
    """(module, host params, description). host params: the numpy parameters read from --init
    (all of them when the init dir holds this task's head with the same labels, else the
    backbone under "funnel"; None from scratch); `place_params` puts them onto the devices and
    initialises the rest."""
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    from funnel_jax import weights
    from funnel_jax.models import MODEL_CLASSES, abstract_params

    dtype = jnp.bfloat16 if settings["dtype"] == "bfloat16" else jnp.float32
    cls = MODEL_CLASSES[task.model_class]
    changes = _config_changes(task, settings)

    if not source.init:
        if not source.model_config:
            raise ConfigError("give --init (a pretrained model) or --model-config (from scratch)")
        config = load_model_config(source.model_config)
        if trained_vocab or config.vocab_size < len(tokenizer):
            config = config.replace(vocab_size=len(tokenizer))
        config = config.replace(architectures=None, **changes)
        module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
        return module, None, f"from scratch ({source.model_config})"

    model_dir, _ = resolve_init(source.init)
    saved = weights.load_config(model_dir)
    saved_arch = (saved.architectures or ("FunnelModel",))[0]
    same_head = (
        saved_arch == task.model_class
        and saved.num_labels == changes["num_labels"]
        and dict(saved.id2label) == dict(changes["id2label"])
    )
    if same_head:
        loaded, host = _load_on_host(model_dir, cls)
        config = loaded.config.replace(**changes)
        module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
        return module, host, f"{model_dir} ({saved_arch}, head included)"

    backbone = BACKBONE[task.model_class]
    try:
        loaded, backbone_host = _load_on_host(model_dir, backbone)
    except weights.WeightsError as e:
        raise weights.WeightsError(
            f"--init {model_dir}: cannot load a {backbone} backbone for {task.model_class} ({e})"
        ) from None
    config = loaded.config.replace(architectures=None, **changes)
    module = cls(config=config, dtype=dtype, param_dtype=jnp.float32)
    want = {p: tuple(v.shape) for p, v in flatten_dict(abstract_params(module)).items()}
    have = {("funnel", *p): tuple(v.shape) for p, v in flatten_dict(backbone_host).items()}
    head = {p: s for p, s in want.items() if p[0] != "funnel"}
    if want != {**have, **head}:
        diff = sorted(set(want.items()) ^ set({**have, **head}.items()))
        raise weights.WeightsError(
            f"--init {model_dir}: the parameters do not fit {task.model_class}: {diff[:5]}"
        )
    logger.warning("newly initialised head parameters: %s", ", ".join(sorted(map("/".join, head))))
    return (
        module,
        {"funnel": backbone_host},
        f"{model_dir} ({saved_arch} backbone as {backbone}; fresh head)",
    )


def place_params(module, host, rng, mesh):
    """The parameters on the devices: on a mesh each leaf read from `host` (numpy) goes
    straight into its sharding by the logical-axis rules, one shard at a time
    (`jax.make_array_from_callback`: no device ever holds a full sharded leaf), and the
    parameters not in `host` (the fresh head, or all of them from scratch) are initialised by
    a jit with those out_shardings; without a mesh all of them go to device 0."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    from funnel_jax import sharding
    from funnel_jax.models import abstract_params, init_params
    from funnel_jax.training.loop import mesh_context

    if host is not None and set(host) == set(abstract_params(module)):
        fresh_fn = None
    elif host is None:
        fresh_fn = lambda k: init_params(module, k)  # noqa: E731
    else:
        fresh_fn = lambda k: init_head(module, k)  # noqa: E731
    if mesh is None:
        device = jax.devices()[0]
        out = {} if host is None else dict(jax.device_put(host, device))
        if fresh_fn is not None:
            out.update(jax.device_put(jax.jit(fresh_fn)(rng), device))
        return out
    # The rules' shardings; a leaf whose size does not divide (e.g. a trained vocabulary of
    # 83 rows over tensor=2) is replicated, as the TrainState's shardings have it.
    param_sh = sharding.tree_shardings_like_params(
        abstract_params(module), sharding.param_shardings(module, mesh), mesh
    )
    out = {}
    if host is not None:
        sh = flatten_dict(param_sh)
        placed = {
            p: jax.make_array_from_callback(x.shape, sh[p], lambda idx, x=x: x[idx])
            for p, x in flatten_dict(host).items()
        }
        out.update(unflatten_dict(placed))
    if fresh_fn is not None:
        fresh_sh = jax.eval_shape(fresh_fn, rng)
        fresh_sh = {k: param_sh[k] for k in fresh_sh}
        with mesh_context(mesh):
            out.update(jax.jit(fresh_fn, out_shardings=fresh_sh)(rng))
    return out


# --------------------------------------------------------------------------- training helpers


def _pad_rows(arrays: dict, n: int) -> dict:
    """Append copies of the last row so that every array has n rows."""
    import numpy as np

    have = next(iter(arrays.values())).shape[0]
    if have == n:
        return arrays
    return {k: np.concatenate([v, np.repeat(v[-1:], n - have, axis=0)]) for k, v in arrays.items()}


def predict(eval_fn, params, features, batch_size: int, put=None) -> dict:
    """Run the model over all features (the last batch padded); task outputs as numpy.
    `put`: host batch -> device (default: as it is); every process passes every feature."""
    import jax
    import numpy as np

    inputs = features.inputs
    n = len(features)
    chunks: dict[str, list] = {}
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in inputs.items()}
        real = next(iter(batch.values())).shape[0]
        batch = _pad_rows(batch, batch_size)
        out = jax.device_get(eval_fn(params, batch if put is None else put(batch)))
        for k, v in out.items():
            chunks.setdefault(k, []).append(np.asarray(v)[:real])
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _is_better(value: float, best: float | None) -> bool:
    if best is None:
        return True
    if value != value:  # nan never improves
        return False
    return best != best or value > best


def _prepare_output_dir(out_dir: Path, overwrite: bool, remove: bool = True) -> dict | None:
    """Check that OUTPUT_DIR can be written. Returns the train_config.json of an earlier run in
    it (to resume or to leave as it is, if the settings match), or None for a fresh start; with
    `overwrite` the outputs of an earlier run are removed first (only where `remove`: process 0
    of several)."""
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
    if not remove:
        return None
    for p in stale:
        shutil.rmtree(p)
    for pattern in ("predictions*", "null_odds*", "eval_results.json", "train_config.json"):
        for p in out_dir.glob(pattern):
            p.unlink()
    return None


def _check_same_run(out_dir: Path, saved: dict | None, now: dict) -> None:
    """Refuse a restart whose entries of `now` (dotted names, e.g. settings.learning_rate)
    differ in the saved train_config.json (called first with the identifying part only)."""
    if saved is None:
        return
    diffs = config_diff({k: saved[k] for k in now if k in saved}, now, RESTART_MAY_CHANGE)
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


def _make_mesh(spec: str | None):
    import jax

    from funnel_jax import sharding

    if spec or jax.device_count() > 1:
        return sharding.make_mesh(spec)
    return None


class _PutBatch:
    """Host batch -> device: device 0 without a mesh, else sharded over (data, fsdp)."""

    def __init__(self, mesh):
        import jax

        from funnel_jax import sharding

        self.mesh = mesh
        self.device = jax.devices()[0]
        self.sharding = None if mesh is None else sharding.batch_sharding(mesh)

    def __call__(self, batch):
        import jax

        from funnel_jax import sharding

        if self.mesh is None:
            return jax.device_put(batch, self.device)
        return sharding.shard_batch(batch, self.mesh)


def _create_state(module, params, tx, rng, mesh, batch_size):
    """(TrainState, its shardings or None, put_batch). `params`: placed by `place_params`. On
    a mesh the state is created by a jit whose out_shardings come from the logical-axis rules
    (the optimizer state is born sharded); without one it is committed to device 0 like a
    restored state."""
    import jax

    from funnel_jax import sharding
    from funnel_jax.train_state import TrainState
    from funnel_jax.training.loop import mesh_context

    put_batch = _PutBatch(mesh)
    if mesh is None:
        state = TrainState.create(params, tx, rng)
        return jax.device_put(state, jax.devices()[0]), None, put_batch
    sharding.check_divisible(batch_size, mesh)
    if batch_size % jax.process_count():
        raise ConfigError(
            f"batch-size {batch_size} is not divisible by the {jax.process_count()} processes"
        )

    def create(p, r):
        return TrainState.create(p, tx, r)

    abstract = jax.eval_shape(create, params, rng)
    state_sh = sharding.tree_shardings_like_params(
        abstract, sharding.param_shardings(module, mesh), mesh
    )
    with mesh_context(mesh):
        state = jax.jit(create, out_shardings=state_sh)(params, rng)
    if jax.process_index() == 0:
        print(
            f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, "
            f"{jax.process_count()} process(es)"
        )
    return state, state_sh, put_batch


class _PutEvalBatch:
    """An evaluation batch (every process holds all of its rows) -> a global array split over
    (data, fsdp), each device given only its rows."""

    def __init__(self, mesh):
        from funnel_jax import sharding

        self.sharding = sharding.batch_sharding(mesh)

    def __call__(self, batch):
        import jax

        return {
            k: jax.make_array_from_callback(v.shape, self.sharding, lambda idx, v=v: v[idx])
            for k, v in batch.items()
        }


def _epoch_batches(
    arrays: dict,
    n: int,
    seed: int,
    start_step: int,
    steps_per_epoch: int,
    bs: int,
    process: tuple[int, int] = (0, 1),
):
    """The training batches from `start_step` on: each epoch a new shuffled order. With
    `process` = (index, count) of several, this process's rows of each global batch of `bs`
    (the index-th of `count` equal slices, in process order, as sharding.shard_batch takes)."""
    index, count = process
    local = bs // count
    step, order_epoch, order = start_step, None, None
    while True:
        epoch, batch_index = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order = _epoch_order(seed, epoch, n, bs)
            order_epoch = epoch
        idx = order[batch_index * bs : (batch_index + 1) * bs][index * local : (index + 1) * local]
        yield {k: v[idx] for k, v in arrays.items()}
        step += 1


def _processes() -> tuple[int, int]:
    """(this process's index, the number of processes): (0, 1) unless jax.distributed runs."""
    jax = sys.modules.get("jax")
    return (0, 1) if jax is None else (jax.process_index(), jax.process_count())


def _barrier(name: str) -> None:
    """Wait for every process (a no-op on one)."""
    if _processes()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"funnel_jax finetune: {name}")


# --------------------------------------------------------------------------- run


def finetune(
    config: FinetuneConfig,
    workdir: str | os.PathLike,
    *,
    progress: bool = True,
    stopper=None,
) -> dict:
    """Fine-tune and evaluate; returns the best evaluation's metrics (eval_results.json).
    Stopped by SIGTERM / SIGINT it returns {"stopped_at": step, "signal": "SIGTERM", ...} (or
    the metrics plus "signal" when the signal came during the final export, which completes
    first). `stopper`: a preemption.PreemptionHandler (default: installed for the call)."""
    from funnel_jax import preemption

    t_start = time.time()
    own = stopper is None
    if own:
        stopper = preemption.PreemptionHandler().install()
    try:
        return _finetune(config, Path(workdir), progress, stopper, t_start)
    finally:
        if own:
            stopper.uninstall()


def _finetune(cfg: FinetuneConfig, out_dir: Path, progress: bool, stopper, t_start) -> dict:
    settings, preset_path = dict(cfg.settings), cfg.preset
    _check_settings(settings)
    cfg.loop.check()
    data, source = cfg.data, cfg.model

    from funnel_jax import preemption
    from funnel_jax.tasks import get_task

    labels = list(data.labels) if data.labels else None
    task = get_task(
        cfg.task,
        text_column=data.text_column,
        text_pair_column=data.text_pair_column,
        label_column=data.label_column,
        labels=labels,
        max_qa_length=settings["max_qa_length"],
        doc_stride=settings["doc_stride"],
        max_query_length=settings["max_query_length"],
        max_answer_length=settings["max_answer_length"],
        n_best_size=settings["n_best_size"],
        null_score_diff_threshold=settings["null_score_diff_threshold"],
        skip_malformed=data.skip_malformed_lines,
    )
    # 1. All data is read and checked before any model work.
    train_examples, eval_examples, files = read_data(task, data)
    metric_name = settings["metric_for_best"] or task.main_metric

    def absolute(path):
        from funnel_jax import hub

        if path is None or (not Path(path).exists() and hub.looks_like_repo_id(str(path))):
            return path  # None, or a Hub id (kept as typed, whatever the working directory)
        return str(Path(path).absolute())

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
            "init": absolute(source.init),
            "tokenizer": absolute(source.tokenizer),
            "model_config": (
                absolute(source.model_config)
                if source.model_config and Path(source.model_config).is_file()
                else source.model_config
            ),
        },
        "data_options": {
            "text_column": data.text_column,
            "text_pair_column": data.text_pair_column,
            "label_column": data.label_column,
            "labels": labels,
            "max_train_examples": data.max_train_examples,
            "max_eval_examples": data.max_eval_examples,
            "skip_malformed_lines": data.skip_malformed_lines,
        },
        "num_train_examples": len(train_examples),
        "num_eval_examples": {k: len(v) for k, v in eval_examples.items()},
    }
    if hasattr(task, "info"):
        run_key.update(task.info())

    # Several processes (jax.distributed initialised before): every process reads all data,
    # trains on its rows of each batch and evaluates all of it (the same results); process 0
    # alone writes the logs and outputs; all take part in the checkpoint saves.
    process_index, process_count = _processes()
    is_main = process_index == 0
    say = print if is_main else (lambda *a, **k: None)
    if hasattr(stopper, "verbose"):
        stopper.verbose = is_main
    saved_info = _prepare_output_dir(out_dir, cfg.overwrite_output_dir, remove=is_main)
    _check_same_run(out_dir, saved_info, run_key)
    resuming = saved_info is not None
    finished = resuming and _is_finished(out_dir)
    _barrier("output dir read")  # by every process before process 0 writes into it
    if finished:
        results = load_json_object(out_dir / "eval_results.json")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
        say(
            f"{out_dir}: this run has already finished; nothing to do ({shown}; model in "
            f"{out_dir / 'best_model'})"
        )
        return results
    if process_count == 1 and stopper.requested:  # (several: they agree at should_stop)
        print(f"{stopper.signal_name} received before training: stopped (nothing to save)")
        return {"stopped_at": None, "output_dir": str(out_dir), "signal": stopper.signal_name}

    import jax
    import numpy as np

    from funnel_jax.checkpoint import TrainCheckpointer, save_model_dir
    from funnel_jax.data import truncation_stride
    from funnel_jax.dropout import dropout_key
    from funnel_jax.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
    from funnel_jax.tasks import EncodeSettings
    from funnel_jax.train_state import jit_train_step, make_train_step
    from funnel_jax.training.loop import Hook, Loop, fit, mesh_context

    # 2. Tokenizer and model.
    tok_dir = out_dir / "tokenizer"
    init_candidates = resolve_init(source.init)[1] if source.init else []
    trained_vocab = not source.tokenizer and not source.init

    def get_tokenizer(saved):
        return load_tokenizer(
            source, init_candidates, lambda: task.texts(train_examples), settings["vocab_size"],
            saved=saved,
        )  # fmt: skip

    if trained_vocab and process_count > 1:  # trained once, by process 0, read by the others
        if is_main:
            tokenizer, tok_source = get_tokenizer(tok_dir if resuming else None)
            if not _has_tokenizer(tok_dir):
                save_tokenizer_atomic(tokenizer, tok_dir)
        _barrier("tokenizer trained")
        if not is_main:
            tokenizer, tok_source = get_tokenizer(tok_dir)
    else:
        tokenizer, tok_source = get_tokenizer(tok_dir if resuming else None)
    rng = jax.random.PRNGKey(settings["seed"])
    init_rng, state_rng = jax.random.split(rng)
    module, host_params, model_source = build_model(
        task, settings, source, tokenizer, trained_vocab
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
            "save_every": cfg.loop.save_every,
            "directory": TRAIN_CHECKPOINTS,
            "keep": KEEP_TRAIN_CHECKPOINTS,
        },
    }
    _check_same_run(out_dir, saved_info, train_info)
    if (
        is_main
        and (not resuming or not _has_tokenizer(tok_dir))
        and not (trained_vocab and process_count > 1)
    ):
        save_tokenizer_atomic(tokenizer, tok_dir)
    if is_main:
        write_json_atomic(out_dir / "train_config.json", train_info)
    # The parameters on the devices: on a mesh shard by shard (place_params).
    mesh = _make_mesh(cfg.mesh)
    params = place_params(module, host_params, init_rng, mesh)
    del host_params
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    eval_sizes = ", ".join(f"{k or 'dev'} {len(v)}" for k, v in eval_examples.items())
    say(
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
            {"params": p},
            **batch,
            deterministic=False,
            rngs={"dropout": dropout_key(dropout_rng, module.config.dropout_rng)},
        )
        return out.loss, {}

    def eval_outputs(p, inputs):
        out = module.apply({"params": p}, **inputs, deterministic=True)
        return task.outputs(out)

    if mesh is None:
        eval_fn, put_eval = jax.jit(eval_outputs), None
    else:  # inputs split over (data, fsdp), outputs gathered whole onto every device
        from jax.sharding import NamedSharding, PartitionSpec

        eval_fn = jax.jit(eval_outputs, out_shardings=NamedSharding(mesh, PartitionSpec()))
        put_eval = _PutEvalBatch(mesh)
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        eval_bs = -(-eval_bs // ways) * ways  # padded rows are dropped from the outputs

    # 5. Evaluation and best-checkpoint bookkeeping. checkpoints/ holds the best parameters;
    # after each training checkpoint only the best of that checkpoint's bookkeeping is kept
    # there, so a restart always finds it (newer ones are made again by the replayed steps).
    if is_main:
        preemption.remove_leftovers(out_dir, subdirs=("checkpoints", TRAIN_CHECKPOINTS))
    _barrier("leftovers removed")
    best_ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=None)
    history_path = out_dir / "eval_history.jsonl"
    best: dict[str, Any] = {"value": None, "metrics": None, "step": None, "epoch": None}
    in_eval = {"now": False}

    def keep_only_best(*also: int | None) -> None:
        """Delete the best-parameter checkpoints other than the best so far and `also`."""
        for s in best_ckpt.all_steps():
            if s != best["step"] and s not in also:
                best_ckpt.delete(s)

    def evaluate(p, step: int, epoch: float) -> dict:
        in_eval["now"] = True
        t0 = time.time()
        all_metrics, all_preds = {}, {}
        for name, feats in eval_feats.items():
            with mesh_context(mesh):
                outputs = predict(eval_fn, p, feats, eval_bs, put_eval)
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
        if is_main:
            with open(history_path, "a", encoding="utf-8") as f:
                row = {"step": step, "epoch": round(epoch, 4), **all_metrics}
                f.write(json.dumps(row) + "\n")
        if improved:  # every process saves (its shards), process 0 writes the files
            best_ckpt.save(step, p, extra={"step": step, "epoch": epoch, metric_name: value})
            best.update(value=value, metrics=all_metrics, step=step, epoch=epoch)
            if is_main:
                for name, preds in all_preds.items():
                    stem = out_dir / (f"predictions_{name}" if name else "predictions")
                    task.write_predictions(stem, eval_examples[name], preds)
                write_json_atomic(out_dir / "eval_results.json", all_metrics)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in all_metrics.items() if not k.endswith("total"))
        say(
            f"eval step {step} (epoch {epoch:.2f}): {shown}"
            f"{' (best)' if improved else ''} [{time.time() - t0:.1f}s]",
            flush=True,
        )
        in_eval["now"] = False
        return all_metrics

    def stopped(step: int, what: str) -> dict:
        best_ckpt.close()
        say(
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
        state, state_sh, put_batch = _create_state(module, params, tx, state_rng, mesh, batch_size)
        del params
        if state_sh is None:
            step_fn = jit_train_step(train_step)
        else:
            with mesh_context(mesh):
                step_fn = jit_train_step(train_step, shardings=(state_sh, put_batch.sharding))

        # Resume: the train state, the data position and the best-metric bookkeeping.
        train_ckpt = TrainCheckpointer(
            out_dir / TRAIN_CHECKPOINTS,
            keep=KEEP_TRAIN_CHECKPOINTS,
            async_save=cfg.loop.async_checkpointing,
        )
        fingerprint = {
            "num_train_features": n_train,
            "batch_size": batch_size,
            "steps_per_epoch": steps_per_epoch,
            "seed": settings["seed"],
        }
        start_step = train_ckpt.latest_step() if resuming else None
        book = {"last_eval_step": 0}
        if start_step is not None:
            with mesh_context(mesh):
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
            book["last_eval_step"] = int(extra["last_eval_step"])
            say(
                f"resuming from step {start_step} of {total_steps} (checkpoint in "
                f"{train_ckpt.directory}; epoch {position['epoch']}, batch {position['batch']}"
                f"; best {metric_name} so far {best['value']} at step {best['step']})",
                flush=True,
            )
        else:
            start_step = 0
        keep_only_best()
        if is_main and resuming:
            _truncate_history(history_path, book["last_eval_step"])
        elif is_main:
            history_path.write_text("")

        # A training checkpoint names the best step so far; a restart from it needs that best
        # checkpoint. So the best checkpoints are pruned only once a save is complete, down to
        # the one it names and the best since (a save in flight may finish after newer bests).
        def pruned_after_save(info: dict) -> None:
            keep_only_best(info["best_step"])

        saves = TrainingSaves(train_ckpt, on_complete=pruned_after_save)

        def save_train_checkpoint(st, at: int) -> None:
            epoch_at, batch_at = divmod(at, steps_per_epoch)  # the next batch to take
            extra = {
                "step": at,
                "data": {"epoch": epoch_at, "batch": batch_at, **fingerprint},
                "best": best,
                "last_eval_step": book["last_eval_step"],
            }
            saves.start(at, st, extra=extra, best_step=best["step"])

        if stopper.should_stop(start_step):  # a collective on several processes
            train_ckpt.close()
            return stopped(start_step, f"stopped before training at step {start_step}")
        # A checkpoint saved on a signal at an evaluation step: that evaluation is still due.
        due = start_step % eval_every == 0 or start_step == total_steps
        if start_step > book["last_eval_step"] and due:
            with mesh_context(mesh):
                evaluate(state.params, start_step, start_step / steps_per_epoch)
            book["last_eval_step"] = start_step

        arrays = {k: train_feats.arrays[k] for k in train_keys}
        batches = _epoch_batches(
            arrays, n_train, settings["seed"], start_step, steps_per_epoch, batch_size,
            process=(process_index, process_count),
        )  # fmt: skip

        def on_log(ctx, rows, examples_per_s) -> dict:
            loss = float(np.mean([r["loss"] for r in rows]))
            lr = float(rows[-1]["learning_rate"])
            if not progress:
                skipped = f", skipped {ctx.skipped}" if ctx.skipped else ""
                say(
                    f"step {ctx.step}/{total_steps}: loss {loss:.4f}, lr {lr:.2e}{skipped}",
                    flush=True,
                )
            return {
                "loss": f"{loss:.4f}",
                "lr": f"{lr:.2e}",
                "ex_s": f"{examples_per_s:.1f}",
                "skipped": ctx.skipped,
            }

        def run_eval(ctx) -> None:
            evaluate(ctx.state.params, ctx.step, ctx.step / steps_per_epoch)
            book["last_eval_step"] = ctx.step

        def on_interrupt(ctx, pending) -> None:  # a second Ctrl-C: save what is consistent
            try:
                jax.block_until_ready(ctx.state)
                at = int(ctx.state.step)
                consistent = at == ctx.step and not in_eval["now"]
                saves.save_last(at, lambda: save_train_checkpoint(ctx.state, at), consistent)
                print(f"\ninterrupted; the newest checkpoint is step {train_ckpt.latest_step()}")
            except Exception as e:  # noqa: BLE001
                print(f"\ninterrupted; no checkpoint written ({e})", file=sys.stderr)
            train_ckpt.close()
            best_ckpt.close()

        hooks = [  # on a signal the evaluation due at that step waits for the restart
            Hook("eval", eval_every, run_eval, at=total_steps, when_stopping=False),
            Hook(
                "checkpoint",
                cfg.loop.save_every,
                lambda ctx: save_train_checkpoint(ctx.state, ctx.step),
            ),
        ]
        loop = Loop(
            start_step=start_step,
            stop_at=total_steps,
            log_every=cfg.loop.log_every,
            max_consecutive_skips=cfg.loop.max_consecutive_skips,
            skip_setting="--max-consecutive-skips",
            progress=progress and is_main,
            desc=task.name,
        )
        try:
            ctx = fit(
                state,
                step_fn,
                batches,
                loop,
                mesh=mesh,
                put_batch=put_batch,
                stopper=stopper,
                hooks=hooks,
                on_log=on_log,
                count=lambda b: batch_size,
                on_interrupt=on_interrupt,
            )
        except Exception:  # e.g. too many skipped steps: the save in flight still completes
            saves.finish_after_error()
            raise
        state, step, stop, train_time = ctx.state, ctx.step, ctx.stopping, ctx.train_time_s
        # The end, or a stop between save points (on SIGTERM too: the process exits only once
        # its checkpoint is complete).
        saves.save_last(step, lambda: save_train_checkpoint(state, step))
        train_ckpt.close()
        if stop:
            return stopped(step, f"checkpoint of step {step} saved")
        final_params = state.params
    else:
        if is_main:
            history_path.write_text("")
        keep_only_best()
        with mesh_context(mesh):
            evaluate(params, 0, 0.0)
        final_params = params

    # 7. Export the best parameters.
    best_ckpt.wait()
    abstract = jax.tree.map(  # restored where the parameters live (sharded on a mesh)
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), final_params
    )
    best_params, _ = best_ckpt.restore(best["step"], abstract)
    best_ckpt.close()
    tok_files = sorted(str(p) for p in tok_dir.iterdir() if p.is_file())
    save_model_dir(
        out_dir / "best_model", module, best_params, extra_files=tok_files, overwrite=True
    )
    results = dict(best["metrics"])
    if is_main:
        write_json_atomic(out_dir / "eval_results.json", results)
    say(
        f"best {metric_name} {best['value']:.4f} at step {best['step']}; "
        f"model in {out_dir / 'best_model'}; {time.time() - t_start:.0f}s "
        f"({train_time:.0f}s training)",
        flush=True,
    )
    if stopper.requested:  # signalled during the final evaluation / export, which completed
        say(f"{stopper.signal_name} received: the run had finished; exiting as interrupted")
        return {**results, "signal": stopper.signal_name}
    return results
