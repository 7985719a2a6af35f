"""Pretraining as a library call: `funnel_jax.pretrain(config, workdir)`.

    import funnel_jax as fj
    cfg = fj.training.load_pretrain_config("tiny", ["model.d_model=32", "train.steps=40"])
    summary = fj.pretrain(cfg, "runs/tiny")       # resumes / is a no-op like the command

Everything lands in `workdir` (see experiments/pretrain.py): run_config.json, tokenizer/,
checkpoints/, metrics.jsonl, tb/, loss_curves.png, final/, summary.json. A run started on a
directory holding checkpoints resumes from the newest one and ends bit-identical (CPU) to an
uninterrupted run; a finished run is left as it is; other settings are refused, naming the
field. The step loop is funnel_jax.training.loop.fit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from funnel_jax.training import presets
from funnel_jax.training.config import (
    PretrainConfig,
    config_diff,
    pretrain_restart_may_change,
)
from funnel_jax.training.files import (
    ConfigError,
    load_json_object,
    save_tokenizer_atomic,
    write_json_atomic,
)
from funnel_jax.training.overrides import apply_overrides
from funnel_jax.training.pretrain_report import format_summary, plot_losses
from funnel_jax.training.run_log import MetricsLog, NullLog, mean_metrics
from funnel_jax.training.saves import TrainingSaves

SECTIONS = PretrainConfig.SECTIONS


# --------------------------------------------------------------------------- settings


def _strip_comments(d):
    if isinstance(d, dict):
        return {k: _strip_comments(v) for k, v in d.items() if not str(k).startswith("_")}
    return d


def resolve_config_path(name: str) -> Path:
    """A pretraining preset (configs/pretrain/NAME.json) or a path."""
    path = Path(name)
    if path.suffix == ".json" or os.sep in name or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"pretraining config not found: {path}")
        return path
    found = presets.preset_path("pretrain", name)
    if found is None:
        names = presets.preset_names("pretrain")
        raise FileNotFoundError(f"no pretraining config named {name!r}; have {names}")
    return found


def _resolve_model_preset(model: dict) -> dict:
    model = dict(model)
    preset = model.pop("preset", None)
    if preset is None:
        return model
    preset_path = presets.preset_path("models", str(preset))
    if preset_path is None:
        names = presets.preset_names("models")
        raise ConfigError(f"model.preset {preset!r} not found in configs/models/ ({names})")
    base = load_json_object(preset_path)
    for k in ("architectures", "model_type", "tie_word_embeddings"):
        base.pop(k, None)
    if "block_sizes" in model and "block_repeats" not in model:
        base.pop("block_repeats", None)  # the preset's repeats fit the preset's blocks
    return {**base, **model}


def load_pretrain_config(
    config: str | os.PathLike = "tiny",
    overrides: Iterable[str] = (),
    values: Mapping[tuple[str, str], Any] | None = None,
) -> PretrainConfig:
    """The settings of a run: the file (a preset name or a path) < `overrides` ("SECTION.KEY=
    VALUE", as --set) < `values` ({(section, key): value}, e.g. the command's own flags),
    checked (ConfigError / FileNotFoundError naming what is wrong)."""
    path = resolve_config_path(str(config))
    raw = _strip_comments(load_json_object(path))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; expected {list(SECTIONS)}")
    cfg = apply_overrides(raw, overrides, SECTIONS)
    for (section, key), value in (values or {}).items():
        if value is not None:
            cfg.setdefault(section, {})[key] = value
    cfg["model"] = _resolve_model_preset(cfg.get("model", {}))
    out = PretrainConfig.from_dict({**cfg, "config_file": str(path)})
    check_pretrain_config(out)
    return out


def check_pretrain_config(cfg: PretrainConfig) -> None:
    from funnel_jax import validation
    from funnel_jax.config import FunnelConfig
    from funnel_jax.electra import ObjectiveConfig
    from funnel_jax.optim import OptimizerConfig

    names = {f.name for f in dataclasses.fields(FunnelConfig)}
    unknown = sorted(set(cfg.model) - names)
    if unknown:
        raise ConfigError(f"unknown model setting(s) {unknown} (FunnelConfig has no such field)")
    FunnelConfig.from_dict({**cfg.model, "vocab_size": cfg.model.get("vocab_size", 30522)})
    ObjectiveConfig.from_dict(cfg.objective)
    OptimizerConfig.from_dict(cfg.optimizer)
    cfg.check()
    accum = cfg.optimizer.get("grad_accum_steps", 1)
    if cfg.data.batch_size % accum:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must be a multiple of "
            f"optimizer.grad_accum_steps={accum}"
        )
    validation.check_pretrain_settings(cfg.to_dict())  # cross-section contradictions


# --------------------------------------------------------------------------- helpers


def _is_main() -> bool:
    """Process 0 writes logs, plots and exports (every process saves checkpoints)."""
    return "jax" not in sys.modules or sys.modules["jax"].process_index() == 0


def _write_json(path: Path, obj) -> None:
    if _is_main():
        write_json_atomic(path, obj)


def get_tokenizer(data_dir: str, out_dir: Path):
    """(tokenizer of the prepared `data_dir`, its copy in out_dir/tokenizer, whether the
    preparation trained it)."""
    from funnel_jax import loader, prepare
    from funnel_jax.tokenizer import FunnelTokenizer

    src = loader.tokenizer_dir(data_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"--data {data_dir}: the tokenizer directory not found: {src}")
    tok = FunnelTokenizer.from_pretrained(src)
    tok_dir = out_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file() and _is_main():
        save_tokenizer_atomic(tok, tok_dir)
    trained = prepare.read_manifest(data_dir).get("request", {}).get("train_vocab") is not None
    return tok, tok_dir, trained


def check_seq_len(cfg: PretrainConfig, model_cfg) -> None:
    if cfg.data.seq_len < model_cfg.min_seq_len():
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} is too short: this model needs at least "
            f"{model_cfg.min_seq_len()} tokens to pool in every block"
        )


def model_structure(cfg: PretrainConfig):
    """The run's FunnelConfig before the tokenizer is known (vocab_size a placeholder when
    unset): what the data preparation needs (data.truncation_stride)."""
    from funnel_jax.config import FunnelConfig

    fields = dict(cfg.model)
    fields.setdefault("vocab_size", None)
    if fields["vocab_size"] is None:
        fields["vocab_size"] = 1
    return FunnelConfig.from_dict(fields)


def resolve_settings(cfg: PretrainConfig, tok):
    """(FunnelConfig, ObjectiveConfig, OptimizerConfig, total_steps) of a run config; the
    model's vocab_size defaults to the tokenizer's size."""
    from funnel_jax.config import FunnelConfig
    from funnel_jax.electra import ObjectiveConfig
    from funnel_jax.optim import OptimizerConfig

    model_fields = dict(cfg.model)
    vocab = model_fields.get("vocab_size")
    if vocab is None:
        model_fields["vocab_size"] = len(tok)
    elif vocab < len(tok):
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {len(tok)}")
    model_cfg = FunnelConfig.from_dict(model_fields)
    check_seq_len(cfg, model_cfg)
    objective_cfg = ObjectiveConfig.from_dict(cfg.objective)
    opt_cfg = OptimizerConfig.from_dict(cfg.optimizer)
    total_steps = opt_cfg.total_steps or cfg.train.steps
    return model_cfg, objective_cfg, opt_cfg, total_steps


@functools.lru_cache(maxsize=4)
def _build(model_cfg, objective_cfg, opt_cfg, special, seq_len, dtype_name, total_steps):
    """(objective, optimizer, jitted train step, jitted eval step, init_state, step_fn,
    jitted init_state);
    cached so that runs in one process with the same settings (tests, restarts) reuse the
    compiled code. Called (traced) inside the mesh by the caller when there is one."""
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

    def init_state(key):
        k_init, k_train = jax.random.split(key)
        return TrainState.create(objective.init(k_init), tx, k_train)

    return objective, tx, train_step, eval_step, init_state, step_fn, jax.jit(init_state)


@dataclasses.dataclass
class PretrainProgram:
    """The jitted functions of a run, as the run uses them. With a mesh: `train_step` and
    `init_state` have the rules' shardings (state_sh, batch_sh) and must be traced and called
    inside `loop.mesh_context(mesh)`; without one: plain jit on one device."""

    objective: Any
    tx: Any
    train_step: Any
    eval_step: Any
    init_state: Any  # jitted: PRNG key -> TrainState (sharded on a mesh)
    mesh: Any = None
    state_sh: Any = None
    batch_sh: Any = None


def build_program(cfg: PretrainConfig, tok, mesh=None) -> PretrainProgram:
    """The objective, optimizer and jitted step / eval / init of a run on `mesh` (or None)."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from funnel_jax import sharding
    from funnel_jax.data import SpecialIds
    from funnel_jax.train_state import jit_train_step

    model_cfg, objective_cfg, opt_cfg, total_steps = resolve_settings(cfg, tok)
    special = SpecialIds.from_tokenizer(tok)
    objective, tx, train_step, eval_step, init_state, step_fn, init_jit = _build(
        model_cfg, objective_cfg, opt_cfg, special, cfg.data.seq_len, cfg.train.dtype, total_steps
    )
    if mesh is None:
        return PretrainProgram(objective, tx, train_step, eval_step, init_jit)
    sharding.check_divisible(cfg.data.batch_size, mesh)
    with sharding.use_mesh(mesh):
        boxed = jax.eval_shape(lambda: objective.init(jax.random.PRNGKey(0), unbox=False))
        params_sh = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh)
        abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
        state_sh = sharding.tree_shardings_like_params(abstract_state, params_sh, mesh)
        batch_sh = sharding.batch_sharding(mesh)
        train_step = jit_train_step(step_fn, shardings=(state_sh, batch_sh))
        eval_step = jax.jit(objective.eval_step, out_shardings=NamedSharding(mesh, PartitionSpec()))
        init = jax.jit(init_state, out_shardings=state_sh)
    return PretrainProgram(objective, tx, train_step, eval_step, init, mesh, state_sh, batch_sh)


def make_mesh(spec: str | None):
    """The run's mesh: `spec`, or data parallel over several devices, or None on one."""
    import jax

    from funnel_jax import sharding

    if spec or jax.device_count() > 1:
        return sharding.make_mesh(spec)
    return None


def build_from_output_dir(output_dir: str | os.PathLike):
    """(objective, optimizer, tokenizer, run config dict) of the run in `output_dir`."""
    from funnel_jax.tokenizer import FunnelTokenizer

    out = Path(output_dir)
    raw = load_json_object(out / "run_config.json")
    cfg = PretrainConfig.from_dict(raw)
    tok = FunnelTokenizer.from_pretrained(out / "tokenizer")
    program = build_program(cfg, tok)
    return program.objective, program.tx, tok, raw


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


# --------------------------------------------------------------------------- the run


def pretrain(
    config: PretrainConfig | str = "tiny",
    workdir: str | os.PathLike = "runs/pretrain",
    *,
    stop_after: int | None = None,
    progress: bool = True,
    stopper=None,
) -> dict:
    """Run (or resume) a pretraining job in `workdir`; returns the summary (summary.json).

    `config`: a PretrainConfig or a preset name / path (load_pretrain_config). `stop_after=K`
    stops (with a checkpoint) after step K as if interrupted: {"stopped_at": K, ...}. `stopper`:
    a preemption.PreemptionHandler whose SIGTERM / SIGINT request stops the run after the step
    in flight, with a checkpoint ({"stopped_at": step, "signal": "SIGTERM", ...}); without one
    the handlers are installed for the call. jax.distributed, when used, must be initialised
    before (funnel_jax.sharding.initialize_distributed).
    """
    from funnel_jax import preemption

    t_start = time.time()
    if not isinstance(config, PretrainConfig):
        config = load_pretrain_config(config)
    own = stopper is None
    if own:
        stopper = preemption.PreemptionHandler().install()
    try:
        return _pretrain(config, Path(workdir), stop_after, progress, stopper, t_start)
    finally:
        if own:
            stopper.uninstall()


def _absolute_inputs(cfg: PretrainConfig) -> PretrainConfig:
    corpus = None if cfg.corpus is None else tuple(str(Path(p).absolute()) for p in cfg.corpus)
    tok = None if cfg.tokenizer is None else str(Path(cfg.tokenizer).absolute())
    data_dir = None if cfg.data_dir is None else str(Path(cfg.data_dir).absolute())
    return cfg.replace(corpus=corpus, tokenizer=tok, data_dir=data_dir)


def _pretrain(cfg, out_dir: Path, stop_after, progress, stopper, t_start) -> dict:
    from funnel_jax import preemption, validation

    check_pretrain_config(cfg)
    cfg = _absolute_inputs(cfg)
    stopper.sync_every = cfg.train.log_every
    validation.check_output_dir(out_dir)  # created, and writable
    run_config_path = out_dir / "run_config.json"
    if run_config_path.exists():
        diffs = config_diff(
            load_json_object(run_config_path), cfg.to_dict(), pretrain_restart_may_change()
        )
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
    _write_json(run_config_path, cfg.to_dict())

    import jax
    import numpy as np

    from funnel_jax import sharding
    from funnel_jax.checkpoint import TrainCheckpointer, save_model_dir
    from funnel_jax.electra import evaluate
    from funnel_jax.train_state import abstract_train_state
    from funnel_jax.training.loop import Hook, Loop, fit, mesh_context
    from funnel_jax.training.pretrain_data import build_prepared_data, prepare_run_data

    is_main = jax.process_index() == 0
    stopper.verbose = is_main
    steps, seed = cfg.train.steps, cfg.train.seed
    stop_at = steps if stop_after is None else min(stop_after, steps)
    if stop_at < 0:
        raise ConfigError(f"--stop-after must be >= 0, got {stop_after}")

    # One data path for every corpus: prepared shards read by the loader (pretrain_data.py).
    structure = model_structure(cfg)
    check_seq_len(cfg, structure)  # before preparing data for it
    data_dir = prepare_run_data(cfg, out_dir, structure, progress=progress)
    tok, tok_dir, trained = get_tokenizer(data_dir, out_dir)
    model_cfg = resolve_settings(cfg, tok)[0]
    pi, pc = jax.process_index(), jax.process_count()
    train_data, eval_batches = build_prepared_data(
        cfg.replace(data_dir=data_dir), model_cfg, pi, pc
    )

    # Device mesh: none on a single device (plain jit); otherwise params, optimizer state and
    # batches are sharded by the logical-axis rules (funnel_jax/sharding.py), and every traced
    # or executed call runs inside the mesh and the rules (mesh_context).
    mesh = make_mesh(cfg.mesh)
    program = build_program(cfg, tok, mesh)
    objective = program.objective
    if mesh is None:
        device = jax.devices()[0]

        def put_batch(b):
            return jax.device_put(b, device)
    else:

        def put_batch(b):
            return sharding.shard_batch(b, mesh)

        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {pc} process(es)")
    eval_batches = [put_batch(b) for b in eval_batches]
    eval_rng = jax.random.PRNGKey(seed + 1)

    def run_eval(params) -> dict:
        with mesh_context(mesh):
            return evaluate(program.eval_step, params, eval_batches, eval_rng)

    if is_main:  # unfinished checkpoint / export dirs of a killed run (never read anyway)
        preemption.remove_leftovers(out_dir)
    ckpt = TrainCheckpointer(out_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                             async_save=cfg.train.async_checkpointing)  # fmt: skip
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
        abstract = abstract_train_state(objective.abstract_params(), program.tx)
        if mesh is not None:
            abstract = jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                abstract,
                program.state_sh,
            )
        state, extra = ckpt.restore(start_step, abstract)
        train_data.restore(extra["data"])
        if is_main:
            print(f"resuming from the checkpoint of step {start_step} in {out_dir / 'checkpoints'}")
    else:
        # Created where it lives: sharded by the rules on a mesh (never a full copy on one
        # device), else committed to the device like a restored state (one compiled step).
        with mesh_context(mesh):
            state = program.init_state(jax.random.PRNGKey(seed))
        if mesh is None:
            state = jax.device_put(state, jax.devices()[0])
    start_step = int(state.step)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    export_module, export_params = objective.export(state.params)
    n_export = int(sum(np.prod(x.shape) for x in jax.tree.leaves(export_params)))
    del export_params

    log = MetricsLog(out_dir, start_step, steps) if is_main else NullLog()
    start_eval_path = out_dir / "eval_start.json"
    if start_eval_path.exists():
        start_metrics = load_json_object(start_eval_path)
    else:
        start_metrics = run_eval(state.params)
        _write_json(start_eval_path, start_metrics)
        log.write(0, "eval", start_metrics)

    print(
        f"{objective.name} pretraining: {n_params:,} parameters ({type(export_module).__name__} "
        f"{n_export:,}), vocab {model_cfg.vocab_size}"
        f"{' (trained)' if trained else ''}, seq {cfg.data.seq_len}, batch {cfg.data.batch_size}, "
        f"{train_data.num_tokens:,} train tokens, steps {start_step}->{stop_at} of {steps}"
    )

    if stopper.should_stop(start_step):  # a collective on several processes: all stop here
        log.close()
        return stopped_before_training(start_step)

    saves = TrainingSaves(ckpt)

    def save_checkpoint(st, step: int, data_position) -> None:
        """With train.async_checkpointing the arrays are copied off the device and written in
        the background while the next steps run."""
        saves.start(step, st, extra={"data": data_position, "step": step})

    def on_log(ctx, rows, tokens_per_s) -> dict:
        mean = mean_metrics(rows)
        if tokens_per_s is not None:
            mean["tokens_per_s"] = tokens_per_s
        log.write(ctx.step, "train", mean)
        post = {"loss": f"{mean['loss']:.3f}", "mlm": f"{mean['mlm_loss']:.3f}"}
        if "disc_loss" in mean:
            post["disc"] = f"{mean['disc_loss']:.4f}"
            post["rtd_acc"] = f"{mean['disc_acc']:.3f}"
        post["tok/s"] = f"{mean.get('tokens_per_s', 0.0):.0f}"
        return post

    def on_interrupt(ctx, pending) -> None:
        try:  # ctx.state is the last completed step's (unless the interrupt hit mid-dispatch)
            if pending:
                log.write(ctx.step, "train", mean_metrics(jax.device_get(pending)))
            jax.block_until_ready(ctx.state)
            at = int(ctx.state.step)
            saves.save_last(at, lambda: save_checkpoint(ctx.state, at, ctx.data_state))
            print(f"\ninterrupted: checkpoint of step {int(ctx.state.step)} saved; rerun to resume")
        except Exception as e:  # noqa: BLE001
            print(f"\ninterrupted; no checkpoint written ({e}); rerun to resume", file=sys.stderr)
        log.close()

    hooks = [
        Hook(
            "eval",
            cfg.train.eval_every,
            lambda ctx: log.write(ctx.step, "eval", run_eval(ctx.state.params)),
            below=steps,
        ),
        Hook(
            "checkpoint",
            cfg.train.save_every,
            lambda ctx: save_checkpoint(ctx.state, ctx.step, ctx.data_state),
            below=stop_at,
        ),
    ]
    loop = Loop(
        start_step=start_step,
        stop_at=stop_at,
        total_steps=steps,
        log_every=cfg.train.log_every,
        max_consecutive_skips=cfg.train.max_consecutive_skips,
        progress=progress and is_main,
        desc=objective.name,
    )
    try:
        ctx = fit(
            state,
            program.train_step,
            train_data,
            loop,
            mesh=mesh,
            put_batch=put_batch,
            data_state=train_data.state,
            stopper=stopper,
            hooks=hooks,
            on_log=on_log,
            count=lambda b: int(b["attention_mask"].sum()) * pc,
            on_interrupt=on_interrupt,
        )
    except Exception:  # e.g. too many skipped steps: the save in flight still completes
        saves.finish_after_error()
        raise
    state, step = ctx.state, ctx.step
    # On SIGTERM too: the process exits only once its checkpoint is complete.
    saves.save_last(
        step, lambda: save_checkpoint(state, step, ctx.data_state or train_data.state())
    )
    if step < steps:
        log.close()
        ckpt.close()
        print(f"stopped after step {step} of {steps}; rerun the command to resume")
        stopped = {"stopped_at": step, "steps": steps, "output_dir": str(out_dir)}
        return {**stopped, "signal": stopper.signal_name}  # signal: None, "SIGTERM", "SIGINT"

    end_metrics = run_eval(state.params)
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
        "train_time_s": ctx.train_time_s,
        "first_step_s": ctx.compile_s,
        "tokens_per_s": ctx.items / ctx.train_time_s if ctx.train_time_s > 0 else 0.0,
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
