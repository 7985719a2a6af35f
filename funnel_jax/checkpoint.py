"""Orbax checkpoints: model directories and training checkpoints.

Every Orbax call of the project lives in this module.

Model directory (written by `convert.torch_to_orbax`, read by `funnel_jax.from_pretrained`)::

    DIR/config.json          FunnelConfig.to_dict(), `architectures` = [class name]
    DIR/params/              Orbax StandardCheckpointHandler checkpoint of the Flax params
    DIR/tokenizer.json ...   tokenizer files copied as they are (optional)

`save_model_dir` writes it atomically: everything goes into a hidden temporary sibling that is
renamed onto DIR at the end, so after any failure DIR is either absent or the previous version.

Training checkpoints (`TrainCheckpointer`) are an `ocp.CheckpointManager` directory of steps,
each holding `state` (any pytree of arrays, StandardSave) and `extra` (a small JSON dict).
Orbax writes each step into `<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a
step killed mid-write is never listed nor restored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict
from orbax.checkpoint import checkpoint_managers as ocm

from funnel_jax import weights
from funnel_jax.config import FunnelConfig
from funnel_jax.models import abstract_params

logger = logging.getLogger("funnel_jax")

PARAMS_DIR = "params"
CONFIG_NAME = weights.CONFIG_NAME
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree does not match the requested one: names and shapes listed."""


# --- helpers -------------------------------------------------------------------------------


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous checkpointer for one pytree of arrays."""
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _name(keypath) -> str:
    return "/".join(ocp.tree.str_keypath(keypath))


def _flat_metadata(tree) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of an Orbax metadata tree (None / empty nodes hold nothing)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(kp): (tuple(m.shape), m.dtype) for kp, m in leaves}


def _stored_shape(leaf) -> tuple[int, ...]:
    """The shape Orbax stores for a target leaf (typed PRNG keys are stored as key data)."""
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(np.shape(leaf))


def _check_tree(stored: Mapping, target, what: str, stored_name: str, target_name: str) -> None:
    """Raise CheckpointMismatchError unless `target` has exactly the names/shapes of `stored`."""
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    wanted = {_name(kp): _stored_shape(leaf) for kp, leaf in leaves}
    missing = [f"{k} {wanted[k]}" for k in wanted if k not in stored]
    unexpected = [f"{k} {stored[k][0]}" for k in stored if k not in wanted]
    mismatched = [
        f"{k}: {stored_name} {stored[k][0]} vs {target_name} {wanted[k]}"
        for k in wanted
        if k in stored and tuple(stored[k][0]) != wanted[k]
    ]
    problems = []
    if missing:
        problems.append(f"in the {target_name} but not in the {stored_name}: " + ", ".join(missing))
    if unexpected:
        problems.append(
            f"in the {stored_name} but not in the {target_name}: " + ", ".join(unexpected)
        )
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise CheckpointMismatchError(f"{what}: " + " | ".join(problems))


def _unwrap_params(params):
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    return params


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` onto `dst`; with `overwrite`, the old `dst` goes only after."""
    old = None
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class atomic_directory:  # noqa: N801 (used as a context manager, like open())
    """`with atomic_directory(dst) as tmp:` write into `tmp`; on success `tmp` becomes `dst`.

    On any exception (or KeyboardInterrupt) the temporary directory is removed and `dst` is left
    as it was. `dst` must not exist unless `overwrite`.
    """

    def __init__(self, dst: str | os.PathLike, overwrite: bool = False):
        self.dst = Path(dst).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if (self.dst.exists() or self.dst.is_symlink()) and not self.overwrite:
            raise FileExistsError(f"{self.dst} already exists (pass overwrite=True to replace it)")
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        if exc_type is None:
            try:
                _replace_dir(self.tmp, self.dst, self.overwrite)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


# --- model directories ---------------------------------------------------------------------


def write_model_files(
    directory: str | os.PathLike, module: nn.Module, params, extra_files: Iterable = ()
) -> None:
    """Write params (Orbax), config.json and copies of `extra_files` into an existing, empty
    `directory` (no atomicity here: see `save_model_dir`)."""
    directory = Path(directory)
    params = _unwrap_params(params)
    expected = flatten_dict(abstract_params(module))
    _check_tree(
        {"/".join(p): (tuple(v.shape), v.dtype) for p, v in expected.items()},
        params,
        f"the params to save do not match {type(module).__name__}",
        f"{type(module).__name__}",
        "params",
    )
    if jax.process_index() == 0:  # several processes: all write the arrays, one the rest
        for src in extra_files:
            src = Path(src)
            if not src.is_file():
                raise FileNotFoundError(f"extra file to copy not found: {src}")
            shutil.copy2(src, directory / src.name)
        config: FunnelConfig = module.config.replace(architectures=(type(module).__name__,))
        config.to_json_file(directory / CONFIG_NAME)
    _checkpointer().save(directory / PARAMS_DIR, args=ocp.args.StandardSave(params))


def save_model_dir(
    directory: str | os.PathLike,
    module: nn.Module,
    params,
    extra_files: Iterable = (),
    overwrite: bool = False,
) -> Path:
    """Write an Orbax model directory atomically (see the module docstring for the layout).

    `extra_files` (e.g. tokenizer files) are copied as they are. Refuses an existing
    `directory` unless `overwrite`; the old one is replaced only once the new one is complete.
    With several processes (jax.distributed) every process must call it: each writes its
    shards of `params` (global, sharded arrays), process 0 the other files and the rename.
    """
    if jax.process_count() > 1:
        return _save_model_dir_multiprocess(Path(directory), module, params, extra_files, overwrite)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_model_files(tmp, module, params, extra_files)
    return Path(directory)


def _save_model_dir_multiprocess(dst: Path, module, params, extra_files, overwrite) -> Path:
    """save_model_dir on several processes: one temporary directory for all of them (a fixed
    name that preemption.remove_leftovers knows), renamed by process 0 once all have written."""
    from jax.experimental import multihost_utils

    dst = dst.absolute()
    if (dst.exists() or dst.is_symlink()) and not overwrite:  # every process sees it: all raise
        raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
    tmp = dst.with_name(f".{dst.name}.tmp-multiprocess")
    main = jax.process_index() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices(f"funnel_jax save_model_dir {dst} start")
    write_model_files(tmp, module, params, extra_files)
    multihost_utils.sync_global_devices(f"funnel_jax save_model_dir {dst} written")
    if main:
        _replace_dir(tmp, dst, overwrite)
    multihost_utils.sync_global_devices(f"funnel_jax save_model_dir {dst} renamed")
    return dst


def is_orbax_model_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by `save_model_dir` (config.json + Orbax `params/`)."""
    path = Path(path)
    params = path / PARAMS_DIR
    return (
        (path / CONFIG_NAME).is_file()
        and params.is_dir()
        and any((params / m).exists() for m in _ORBAX_MARKERS)
    )


def _read_params_metadata(params_dir: Path) -> dict[tuple[str, ...], tuple[tuple, Any]]:
    try:
        meta = _checkpointer().metadata(params_dir)
        tree = meta.item_metadata
        tree = getattr(tree, "tree", tree)
    except Exception as e:  # noqa: BLE001 (Orbax raises many types)
        raise weights.WeightsError(f"{params_dir}: cannot read the Orbax checkpoint ({e})") from e
    if tree is None:
        raise weights.WeightsError(f"{params_dir}: the Orbax checkpoint has no metadata")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {ocp.tree.str_keypath(kp): (tuple(m.shape), np.dtype(m.dtype)) for kp, m in leaves}


def _restore_params(params_dir: Path, target):
    try:
        return _checkpointer().restore(params_dir, args=ocp.args.StandardRestore(target))
    except Exception as e:  # noqa: BLE001
        raise weights.WeightsError(
            f"{params_dir}: cannot restore the Orbax checkpoint ({e})"
        ) from e


def load_model_dir(
    path: str | os.PathLike,
    model_class=None,
    dtype=None,
    param_dtype=None,
    rng: jax.Array | None = None,
    host: bool = False,
    **config_overrides,
):
    """Load `(module, params)` from a `save_model_dir` directory.

    `host`: the parameters come back as numpy arrays (fine-tuning then places them shard by
    shard): read straight from the files into numpy when the tree is `module`'s, else
    converted on the host's CPU backend (never on an accelerator).

    `config_overrides` replace config fields (e.g. `num_labels=3` for a fresh head).

    The class comes from config.json's `architectures` unless `model_class` (a name or class)
    is given; loading into another class follows `weights.state_dict_to_params` exactly (decoder
    dropped for base-model heads, head stripped for bare backbones, missing heads initialised
    fresh with a warning naming each parameter, anything else raises `weights.WeightsError`).
    `dtype` is the compute dtype (default float32) and, unless `param_dtype` is given, also the
    parameter dtype; with neither, the parameters keep the dtype they were stored in.
    """
    path = Path(path)
    config = weights.load_config(path)
    saved_cls = weights.resolve_model_class(config)
    saved_config = config
    if config_overrides:
        config = config.replace(**config_overrides)
    cls = weights.resolve_model_class(config, model_class)
    params_dir = (path / PARAMS_DIR).absolute()
    stored = _read_params_metadata(params_dir)

    if param_dtype is None:
        param_dtype = dtype
    if param_dtype is None:
        floats = [d for _, d in stored.values() if jax.numpy.issubdtype(d, np.floating)]
        param_dtype = floats[0] if floats else jax.numpy.float32
    compute_dtype = jax.numpy.float32 if dtype is None else dtype
    module = cls(config=config, dtype=compute_dtype, param_dtype=param_dtype)
    expected = flatten_dict(abstract_params(module))

    # Restore onto this process's first device whatever topology saved it (e.g. a mesh).
    _local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    same = set(expected) == set(stored) and all(
        tuple(expected[p].shape) == stored[p][0] for p in expected
    )
    if same and host:  # numpy, in the stored dtype, cast on the host
        target = unflatten_dict({p: np.empty(stored[p][0], stored[p][1]) for p in expected})
        host_params = flatten_dict(_restore_params(params_dir, target))
        return module, unflatten_dict(
            {p: np.asarray(v).astype(expected[p].dtype, copy=False) for p, v in host_params.items()}
        )
    if same:  # restore straight into the target dtype
        target = unflatten_dict(
            {
                p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=_local)
                for p, s in expected.items()
            }
        )
        host = flatten_dict(_restore_params(params_dir, target))
        # Uncommitted device arrays, as `weights.from_pretrained` gives; one tensor at a time.
        out = {}
        for p in list(host):
            out[p] = jax.numpy.asarray(host.pop(p))
        return module, unflatten_dict(out)

    # Another class: restore as numpy, then apply the state-dict rules of weights.py.
    if host:
        target = unflatten_dict({p: np.empty(s, d) for p, (s, d) in stored.items()})
    else:
        target = unflatten_dict(
            {p: jax.ShapeDtypeStruct(s, d, sharding=_local) for p, (s, d) in stored.items()}
        )
    restored = _restore_params(params_dir, target)
    saved_module = saved_cls(config=saved_config)
    state_dict = weights.params_to_state_dict(restored, saved_module)
    del restored
    try:
        with host_device() if host else contextlib.nullcontext():
            params = weights.state_dict_to_params(state_dict, module, rng=rng, dtype=param_dtype)
    except weights.WeightsError as e:
        raise weights.WeightsError(f"{path} ({saved_cls.__name__}): {e}") from None
    if host:
        params = jax.tree.map(np.asarray, params)
    return module, params


def host_device():
    """A context in which new jax arrays go to the host's CPU backend (not an accelerator);
    without a CPU backend (JAX_PLATFORMS naming only an accelerator) a no-op."""
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return contextlib.nullcontext()
    return jax.default_device(cpu)


# --- training checkpoints ------------------------------------------------------------------


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | jax.Array):
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _abstract_leaf(x):
    """Restore target of one leaf: arrays and sharding-less structs go to the default device."""
    if isinstance(x, jax.ShapeDtypeStruct):
        if x.sharding is None:
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_default_sharding())
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x  # numpy arrays and python scalars come back as the same type


class TrainCheckpointer:
    """Training checkpoints in `directory/<step>/{state,extra}` via `ocp.CheckpointManager`.

    `keep`: how many of the newest checkpoints to keep (None: all). `save_interval_steps`:
    with `save(..., force=False)`, only steps that are multiples of it are saved (default 1).
    `async_save`: `save` returns once the arrays are copied off the device and writes in the
    background; call `wait()` before reading the files and `close()` at the end.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = 3,
        save_interval_steps: int | None = None,
        async_save: bool = False,
    ):
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"keep must be a positive int or None, got {keep!r}")
        interval = 1 if save_interval_steps is None else int(save_interval_steps)
        if interval < 1:
            raise ValueError(f"save_interval_steps must be positive, got {save_interval_steps!r}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = bool(async_save)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocm.AnySavePolicy(
                [ocm.FixedIntervalPolicy(interval), ocm.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=ocm.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "extra": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )

    def _refresh(self) -> None:
        # Pick up steps written by another program (e.g. an evaluator polling a training run).
        # Not with several processes: each would decide from its own view of the directory and
        # of its own save in flight, and the barriers in save / delete need them to agree.
        if jax.process_count() == 1 and not self._manager.is_saving_in_progress():
            self._manager.reload()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        self._refresh()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, extra: dict | None = None, force: bool = True) -> bool:
        """Save `state` (a pytree of arrays) and `extra` (a JSON-serialisable dict) at `step`.

        Returns False (and writes nothing) when `force` is False and the step is not a multiple
        of `save_interval_steps`, or when the step is already saved.
        """
        step = int(step)
        extra = {} if extra is None else extra
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        try:
            extra = json.loads(json.dumps(dict(extra), default=_json_default))
        except (TypeError, ValueError) as e:
            raise TypeError(f"extra must be JSON-serialisable: {e}") from None
        if step in self._manager.all_steps():
            logger.warning("step %d already saved in %s; not overwritten", step, self.directory)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra)
        )
        return bool(self._manager.save(step, args=args, force=force))

    def restore(self, step: int | None, abstract_state=None) -> tuple[Any, dict]:
        """Restore `(state, extra)` of `step` (None: the latest) onto `abstract_state`.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` (with `.sharding` where the arrays
        should go; none: the default device) or of arrays (their shardings are used). Values are
        cast to the requested dtypes. A tree that differs from the checkpoint in names or shapes
        raises CheckpointMismatchError listing every difference. Without `abstract_state` the
        state comes back as stored, as nested dicts of numpy arrays (for inspection).
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        step = int(step)
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory} (have {steps})"
            )
        meta = self._manager.item_metadata(step)["state"]
        meta = getattr(meta, "tree", meta)
        if abstract_state is None:
            abstract_state = jax.tree.map(
                lambda m: np.empty(tuple(m.shape), np.dtype(m.dtype)), meta
            )
        target = jax.tree.map(_abstract_leaf, abstract_state)
        stored = _flat_metadata(meta)
        _check_tree(
            stored,
            target,
            f"checkpoint {self.directory / str(step)} does not match the abstract state",
            "checkpoint",
            "abstract state",
        )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["extra"] or {})

    def delete(self, step: int) -> None:
        """Remove the complete checkpoint of `step` (a no-op when there is none)."""
        self.wait()
        step = int(step)
        if step in self.all_steps():
            self._manager.delete(step)

    def wait(self) -> None:
        """Block until a background save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
