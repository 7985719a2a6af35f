"""Weight I/O: the `transformers` state-dict layout <-> Flax params, as data.

A torch key maps to a Flax path by a few renaming rules (`blocks.0.1` -> `blocks_0_1`,
`layers.0` -> `layers_0`, Linear `weight` -> `kernel`, LayerNorm `weight` -> `ln/scale`) and
a per-tensor hook that changes the layout (Linear [out, in] -> [in, out]; attention heads split
into [D, N, H]). Every converted tensor is checked against `jax.eval_shape(module.init)`.

No torch here: safetensors files are read with numpy.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from funnel_jax import layer_stack
from funnel_jax.config import FunnelConfig
from funnel_jax.models import (
    FunnelBaseModel,
    FunnelModel,
    abstract_params,
    get_model_class,
    init_params,
)

logger = logging.getLogger("funnel_jax")

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
BACKBONE_PREFIX = "funnel"
HEAD_MODULES = ("discriminator_predictions", "lm_head", "classifier", "qa_outputs")
HEAD_SPLIT = ("q_head", "k_head", "v_head")  # [N*H, D] <-> [D, N, H]


class WeightsError(ValueError):
    """Weights that do not fit the model: the message lists names and shapes."""


# --- key mapping ---------------------------------------------------------------------------


def torch_key_to_flax_path(key: str) -> tuple[str, ...]:
    """'funnel.encoder.blocks.1.0.attention.q_head.weight' ->
    ('funnel', 'encoder', 'blocks_1_0', 'attention', 'q_head', 'kernel')."""
    key = re.sub(r"blocks\.(\d+)\.(\d+)", r"blocks_\1_\2", key)
    key = re.sub(r"layers\.(\d+)", r"layers_\1", key)
    parts = key.split(".")
    *parents, leaf = parts
    parent = parents[-1] if parents else ""
    if parent == "layer_norm":
        return (*parents, "ln", "scale" if leaf == "weight" else leaf)
    if parent == "word_embeddings" and leaf == "weight":
        return (*parents, "embedding")
    if leaf == "weight":
        return (*parents, "kernel")
    return tuple(parts)


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    parts = list(path)
    if len(parts) >= 2 and parts[-2] == "ln":
        parts = parts[:-2] + ["weight" if parts[-1] == "scale" else parts[-1]]
    elif parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    key = ".".join(parts)
    key = re.sub(r"blocks_(\d+)_(\d+)", r"blocks.\1.\2", key)
    return re.sub(r"layers_(\d+)", r"layers.\1", key)


def torch_to_flax_tensor(path: tuple[str, ...], value: np.ndarray, config: FunnelConfig):
    """Per-tensor layout hook, torch -> Flax."""
    n, h = config.n_head, config.d_head
    parent, leaf = path[-2], path[-1]
    if leaf == "kernel":
        if parent in HEAD_SPLIT and value.ndim == 2:  # [N*H, D] -> [D, N, H]
            return value.T.reshape(value.shape[1], n, h)
        if parent == "post_proj" and value.ndim == 2:  # [D, N*H] -> [N, H, D]
            return value.T.reshape(n, h, value.shape[0])
        return value.T if value.ndim == 2 else value
    if leaf == "bias" and parent in HEAD_SPLIT and value.ndim == 1:
        return value.reshape(n, h)
    return value


def torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a tensor of Flax shape `flax_shape` at `path` has in the torch state dict."""
    parent, leaf = path[-2], path[-1]
    if leaf == "kernel":
        if parent in HEAD_SPLIT:
            return (int(np.prod(flax_shape[1:])), flax_shape[0])
        if parent == "post_proj":
            return (flax_shape[-1], int(np.prod(flax_shape[:-1])))
        return tuple(reversed(flax_shape))
    if leaf == "bias" and parent in HEAD_SPLIT:
        return (int(np.prod(flax_shape)),)
    return tuple(flax_shape)


def flax_to_torch_tensor(path: tuple[str, ...], value: np.ndarray):
    """Per-tensor layout hook, Flax -> torch (inverse of `torch_to_flax_tensor`)."""
    parent, leaf = path[-2], path[-1]
    if leaf == "kernel":
        if parent in HEAD_SPLIT:  # [D, N, H] -> [N*H, D]
            return value.reshape(value.shape[0], -1).T
        if parent == "post_proj":  # [N, H, D] -> [D, N*H]
            return value.reshape(-1, value.shape[-1]).T
        return value.T
    if leaf == "bias" and parent in HEAD_SPLIT:
        return value.reshape(-1)
    return value


# --- state dict -> params ------------------------------------------------------------------


def _has_backbone_prefix(module: nn.Module) -> bool:
    return not isinstance(module, FunnelBaseModel | FunnelModel)


def _shape_str(x) -> str:
    return str(tuple(np.shape(x)))


def state_dict_to_params(
    state_dict: Mapping[str, np.ndarray],
    module: nn.Module,
    rng: jax.Array | None = None,
    dtype=None,
):
    """Convert a `transformers` state dict (numpy arrays) into params for `module`.

    Follows `transformers`' cross-class rules: a checkpoint with a decoder loads into a class
    without one (the decoder is dropped), a head checkpoint loads into a bare backbone (the head
    is dropped), and head parameters missing from the checkpoint are initialised fresh (each is
    named in a warning). Any other missing, unexpected or mis-shaped tensor raises WeightsError
    naming every offender and both shapes.
    """
    config: FunnelConfig = module.config
    if config.scan_layers:  # convert per layer, then stack (funnel_jax/layer_stack.py)
        unrolled = module.clone(config=config.replace(scan_layers=False))
        return layer_stack.stack_layers(state_dict_to_params(state_dict, unrolled, rng, dtype))
    expected = flatten_dict(abstract_params(module))
    target_prefixed = _has_backbone_prefix(module)
    has_decoder = any("decoder" in p for p in expected)

    converted, unexpected, mismatched, dropped = {}, [], [], []
    source_prefixed = any(k.startswith(BACKBONE_PREFIX + ".") for k in state_dict)
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue  # tied to the input embedding, as in the reference
        tkey = key
        if source_prefixed and not target_prefixed:
            if not tkey.startswith(BACKBONE_PREFIX + "."):
                dropped.append(key)  # a head, loaded into a bare backbone
                continue
            tkey = tkey[len(BACKBONE_PREFIX) + 1 :]
        elif target_prefixed and not source_prefixed:
            tkey = f"{BACKBONE_PREFIX}.{tkey}"
        path = torch_key_to_flax_path(tkey)
        if path not in expected:
            if not has_decoder and "decoder" in path:
                dropped.append(key)
                continue
            if path[0] in HEAD_MODULES or (
                len(path) > 1 and path[0] == BACKBONE_PREFIX and path[1] in HEAD_MODULES
            ):
                dropped.append(key)
                continue
            unexpected.append(f"{key} {_shape_str(value)}")
            continue
        want = expected[path]
        if tuple(np.shape(value)) != torch_shape(path, tuple(want.shape)):
            mismatched.append(
                f"{key}: checkpoint {_shape_str(value)}, model expects "
                f"{torch_shape(path, tuple(want.shape))} (flax {'/'.join(path)} "
                f"{tuple(want.shape)})"
            )
            continue
        # Cast to a device array right away so that each numpy intermediate is freed at once:
        # peak memory stays near the checkpoint plus the params.
        converted[path] = jax.numpy.asarray(
            torch_to_flax_tensor(path, np.asarray(value), config),
            dtype=want.dtype if dtype is None else dtype,
        )

    missing = [p for p in expected if p not in converted]
    head_missing = [p for p in missing if _is_head_path(p)]
    body_missing = [p for p in missing if not _is_head_path(p)]
    problems = []
    if body_missing:
        problems.append(
            "missing from the checkpoint: "
            + ", ".join(
                f"{flax_path_to_torch_key(_source_path(p, source_prefixed, target_prefixed))} "
                f"{torch_shape(p, tuple(expected[p].shape))}"
                for p in body_missing
            )
        )
    if unexpected:
        problems.append("not in the model: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched))
    if problems:
        raise WeightsError(
            f"checkpoint does not match {type(module).__name__}: " + " | ".join(problems)
        )
    if dropped:
        logger.info(
            "ignored %d checkpoint tensors not used by %s", len(dropped), type(module).__name__
        )
    if head_missing:
        fresh = flatten_dict(init_params(module, rng if rng is not None else jax.random.PRNGKey(0)))
        for p in head_missing:
            converted[p] = fresh[p]
        logger.warning(
            "newly initialised (not in the checkpoint): %s",
            ", ".join(f"{'/'.join(p)} {tuple(expected[p].shape)}" for p in head_missing),
        )
    for path in head_missing:
        want = expected[path].dtype if dtype is None else dtype
        converted[path] = jax.numpy.asarray(converted[path], dtype=want)
    return unflatten_dict(converted)


def _is_head_path(path: tuple[str, ...]) -> bool:
    return path[0] in HEAD_MODULES


def _source_path(path, source_prefixed, target_prefixed):
    if target_prefixed and not source_prefixed and path[0] == BACKBONE_PREFIX:
        return path[1:]
    return path


def params_to_state_dict(params, module: nn.Module) -> dict[str, np.ndarray]:
    """Flax params -> `transformers` state dict (numpy, float32 or the params' dtype).

    The MLM head's `lm_head.weight` is not written: it is tied to the word embedding.
    Stacked layers (scan_layers) are written one entry per layer, as `transformers` has them.
    """
    out = {}
    params = layer_stack.unstack_layers(nn.meta.unbox(params))
    for path, value in flatten_dict(params).items():
        arr = np.asarray(jax.device_get(value))
        out[flax_path_to_torch_key(path)] = np.ascontiguousarray(flax_to_torch_tensor(path, arr))
    return out


# --- files ---------------------------------------------------------------------------------


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays (bf16 is widened to float32)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read safetensors file ({e})") from None
    except TypeError as e:  # e.g. bfloat16, which numpy lacks
        return _read_safetensors_slow(path, e)


def _read_safetensors_slow(path, err):
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(str(path), framework="flax") as f:
            for k in f.keys():
                out[k] = np.asarray(f.get_tensor(k), dtype=np.float32)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{path}: cannot read safetensors file ({err}; {e})") from None
    return out


def read_safetensors_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    directory = Path(directory)
    single = directory / SAFETENSORS_NAME
    index = directory / SAFETENSORS_INDEX_NAME
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(directory / shard))
        return out
    raise FileNotFoundError(f"{directory}: no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX_NAME}")


BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"


def _index_shards(index: Path) -> list[Path]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise WeightsError(f"{index}: shard files not found: {', '.join(missing)}")
    return [index.parent / s for s in shards]


def read_weights_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a `transformers` directory, in the order `transformers` prefers:
    model.safetensors, model.safetensors.index.json's shards, pytorch_model.bin (read
    without torch, funnel_jax.torch_bin), pytorch_model.bin.index.json's shards."""
    from funnel_jax.torch_bin import TorchBinError, read_torch_bin

    directory = Path(directory)
    if (directory / SAFETENSORS_NAME).is_file() or (directory / SAFETENSORS_INDEX_NAME).is_file():
        return read_safetensors_dir(directory)
    files = []
    if (directory / BIN_NAME).is_file():
        files = [directory / BIN_NAME]
    elif (directory / BIN_INDEX_NAME).is_file():
        files = _index_shards(directory / BIN_INDEX_NAME)
    if not files:
        found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        raise FileNotFoundError(
            f"{directory}: no weights (looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
            f"{BIN_NAME}, {BIN_INDEX_NAME}); found: {', '.join(found) or 'nothing'}"
        )
    out: dict[str, np.ndarray] = {}
    for path in files:
        try:
            out.update(read_torch_bin(path))
        except TorchBinError as e:
            raise WeightsError(str(e)) from None
    return out


def load_config(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> FunnelConfig:
    """The FunnelConfig of a model directory or a Hub id (only config.json is fetched)."""
    from funnel_jax import hub

    directory = hub.resolve_config_dir(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}")
    return FunnelConfig.from_json_file(path)


def resolve_model_class(config: FunnelConfig, model_class=None):
    if model_class is None:
        arch = (config.architectures or ("FunnelModel",))[0]
        return get_model_class(arch)
    if isinstance(model_class, str):
        return get_model_class(model_class)
    return model_class


def from_pretrained(
    name_or_path,
    model_class=None,
    dtype=None,
    param_dtype=None,
    rng=None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    **config_overrides,
):
    """Load `(module, params)` from a directory or a Hugging Face Hub id.

    `name_or_path` is a `save_pretrained` / `transformers` directory (config.json plus
    model.safetensors, pytorch_model.bin or a sharded set), an Orbax directory written by
    `convert.torch_to_orbax` / the training loops, or a Hub id such as
    "funnel-transformer/small" (fetched with huggingface_hub into its cache, see
    `funnel_jax.hub`; `revision`, `cache_dir`, `local_files_only`, `token`, HF_HUB_OFFLINE and
    HF_HUB_CACHE as in `transformers`). The class comes from config.json's `architectures`
    unless `model_class` (a name or class) is given. `dtype` sets both the compute and
    parameter dtype unless `param_dtype` is given.
    """
    from funnel_jax import hub

    path = hub.resolve_model_dir(
        name_or_path,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
    )
    from funnel_jax import checkpoint  # local import: Orbax is heavy and optional here

    if checkpoint.is_orbax_model_dir(path):
        return checkpoint.load_model_dir(
            path,
            model_class=model_class,
            dtype=dtype,
            param_dtype=param_dtype,
            rng=rng,
            **config_overrides,
        )
    config = load_config(path)
    if config_overrides:
        config = config.replace(**config_overrides)
    cls = resolve_model_class(config, model_class)
    dtype = jax.numpy.float32 if dtype is None else dtype
    param_dtype = dtype if param_dtype is None else param_dtype
    module = cls(config=config, dtype=dtype, param_dtype=param_dtype)
    state_dict = read_weights_dir(path)
    params = state_dict_to_params(state_dict, module, rng=rng, dtype=param_dtype)
    return module, params


def save_pretrained(
    module: nn.Module, params, directory: str | os.PathLike, push_to_hub: bool = False
) -> None:
    """Write config.json + model.safetensors that `transformers` loads directly.

    `push_to_hub=True` is not implemented: upload the directory with huggingface_hub
    (`HfApi().upload_folder(folder_path=directory, repo_id="ORG/NAME")`, see docs/hub.md).
    """
    if push_to_hub:
        raise NotImplementedError(
            "save_pretrained(push_to_hub=True) is not implemented: save the directory, then "
            "upload it with huggingface_hub: HfApi().create_repo('ORG/NAME', exist_ok=True); "
            "HfApi().upload_folder(folder_path=DIR, repo_id='ORG/NAME') (docs/hub.md)"
        )
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = module.config.replace(architectures=(type(module).__name__,))
    config.to_json_file(directory / CONFIG_NAME)
    state = {
        k: (v.astype(np.float32) if v.dtype not in (np.float32, np.float16) else v)
        for k, v in params_to_state_dict(params, module).items()
    }
    save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
