"""Convert a `transformers` Funnel checkpoint into an Orbax model directory.

    python -m convert.torch_to_orbax SRC DST [--model-class NAME] [--dtype bfloat16]
                                             [--config config.json] [--overwrite]

SRC is a directory as `transformers` writes it (config.json plus model.safetensors,
pytorch_model.bin, or a sharded set named by `*.index.json`), or a single .safetensors /
.bin / .pt state-dict file with `--config` (default: config.json beside it). DST receives the
Orbax checkpoint of the params, config.json, and the tokenizer files found beside the weights,
all at once: DST never exists half-written, and an existing DST is kept unless --overwrite.

Tensors are read one at a time (safetensors by byte range, .bin through `torch.load(mmap=True)`)
and converted as they are read, so the peak memory stays near twice the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from funnel_jax import checkpoint, weights
from funnel_jax.config import FunnelConfig
from funnel_jax.models import (
    FunnelForQuestionAnswering,
    FunnelForSequenceClassification,
    FunnelForTokenClassification,
)
from funnel_jax.weights import WeightsError

logger = logging.getLogger("funnel_jax")

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class ConfigMismatchError(WeightsError):
    """config.json disagrees with the weights: names the field, its value and the tensor."""


# --- readers: one tensor at a time -------------------------------------------------------


class SafetensorsFile:
    """A safetensors file read by byte range (numpy only; no mmap, so RSS stays small).

    The header is checked against the file size on opening, so a truncated or corrupt file is
    reported (with its name) before anything is converted.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise WeightsError(f"{self.path}: truncated safetensors file ({size} bytes)")
                n = int.from_bytes(head, "little")
                if n > size - 8:
                    raise WeightsError(
                        f"{self.path}: truncated or corrupt safetensors file (header of {n} "
                        f"bytes, file of {size} bytes)"
                    )
                header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{self.path}: corrupt safetensors header ({e})") from None
        except OSError as e:
            raise WeightsError(f"{self.path}: cannot read ({e})") from None
        if not isinstance(header, dict):
            raise WeightsError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.start = 8 + n
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        end_max = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = np.dtype(_ST_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(
                    f"{self.path}: corrupt safetensors header entry for {key}: {info!r}"
                ) from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise WeightsError(
                    f"{self.path}: corrupt safetensors header: {key} {shape} {info['dtype']} "
                    f"does not fit its byte range {begin}..{end}"
                )
            self.entries[key] = (dtype, shape, begin, end)
            end_max = max(end_max, end)
        if self.start + end_max > size:
            raise WeightsError(
                f"{self.path}: truncated safetensors file: the header needs "
                f"{self.start + end_max} bytes, the file has {size}"
            )

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e[1] for k, e in self.entries.items()}

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        try:
            arr = np.fromfile(
                self.path,
                dtype=dtype,
                count=(end - begin) // dtype.itemsize,
                offset=self.start + begin,
            )
        except (OSError, ValueError) as e:
            raise WeightsError(f"{self.path}: cannot read tensor {key} ({e})") from None
        return arr.reshape(shape)


class TorchFile:
    """A torch.save'd state dict, memory-mapped when the format allows it."""

    def __init__(self, path: str | os.PathLike):
        import torch

        self.path = Path(path)
        self._torch = torch
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                # Legacy (non-zip) format: no mmap possible.
                obj = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many types for a bad file)
            raise WeightsError(
                f"{self.path}: cannot read PyTorch file, truncated or corrupt? "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
        inner = obj.get("state_dict") if isinstance(obj, Mapping) else None
        if isinstance(inner, Mapping):
            obj = inner
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{self.path}: expected a state dict, found {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise WeightsError(f"{self.path}: entries that are not tensors: {', '.join(bad)}")
        self.tensors = dict(obj)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def get(self, key: str) -> np.ndarray:
        # A copy, so that nothing keeps the (memory-mapped) file alive once it is closed.
        t = self.tensors[key].detach()
        if t.dtype == self._torch.bfloat16:
            return t.contiguous().view(self._torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.contiguous().numpy().copy()


def _open(path: Path):
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFile(path)
    raise WeightsError(f"{path}: unknown weights format (expected .safetensors, .bin, .pt)")


class LazyStateDict(Mapping):
    """A read-only state dict over one or more files; a tensor is read when it is asked for.

    Keys are ordered file by file, and only one torch file is held open at a time.
    """

    def __init__(self, files: list[Path], progress: bool = True):
        self.files = files
        self.progress = progress
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open_path: Path | None = None
        self._open_file = None
        for path in files:
            reader = self._reader(path)
            for key, shape in reader.shapes().items():
                if key in self._where:
                    raise WeightsError(
                        f"tensor {key} appears in both {self._where[key]} and {path}"
                    )
                self._where[key] = path
                self._shapes[key] = shape

    def _reader(self, path: Path):
        if self._open_path != path:
            self._open_file = None  # drop the previous file first
            self._open_file = _open(path)
            self._open_path = path
        return self._open_file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._reader(self._where[key]).get(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def items(self):
        keys = list(self._where)
        if self.progress:
            from tqdm.auto import tqdm

            keys = tqdm(keys, desc="converting", unit="tensor", file=sys.stderr)
        for key in keys:
            yield key, self[key]
        self.close()  # unmap the last file before the caller goes on

    def close(self) -> None:
        self._open_file = None
        self._open_path = None


# --- locating the checkpoint ---------------------------------------------------------------


def _index_files(index: Path) -> list[Path]:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
    shards = []
    for name in weight_map.values():
        if name not in shards:
            shards.append(name)
    paths = [index.parent / s for s in shards]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise WeightsError(f"{index}: shard files not found: {', '.join(missing)}")
    return paths


def find_weights(
    src: str | os.PathLike,
    config_path=None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> tuple[list[Path], Path, Path]:
    """(weight files, config.json, directory holding the weights) for a SRC argument.

    SRC that does not exist locally is taken as a Hugging Face Hub id: config, weights and
    tokenizer files are fetched into the Hub cache (funnel_jax.hub.resolve_model_dir).
    """
    from funnel_jax import hub

    src = hub.resolve_model_dir(
        src,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        token=token,
        tokenizer=True,
    )
    if src.is_file():
        files = _index_files(src) if src.name.endswith(".index.json") else [src]
        folder = src.parent
    elif src.is_dir():
        folder = src
        candidates = [
            (SAFETENSORS_NAME, False),
            (SAFETENSORS_INDEX, True),
            (BIN_NAME, False),
            (BIN_INDEX, True),
        ]
        files = None
        for name, is_index in candidates:
            if (src / name).is_file():
                files = _index_files(src / name) if is_index else [src / name]
                break
        if files is None:
            indexes = sorted(src.glob("*.index.json"))
            singles = sorted(
                p for p in src.iterdir() if p.suffix in (".safetensors", *TORCH_SUFFIXES)
            )
            if len(indexes) == 1:
                files = _index_files(indexes[0])
            elif len(singles) == 1:
                files = singles
            else:
                raise FileNotFoundError(
                    f"{src}: no weights found (looked for {SAFETENSORS_NAME}, "
                    f"{SAFETENSORS_INDEX}, {BIN_NAME}, {BIN_INDEX})"
                )
    else:
        raise FileNotFoundError(f"{src}: no such file or directory")
    config_path = Path(config_path) if config_path is not None else folder / weights.CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path}: config file not found (pass --config for a bare weights file)"
        )
    return files, config_path, folder


def load_config(config_path: Path, model_class: str | None = None):
    """FunnelConfig and model class name from config.json (`model_class` wins)."""
    try:
        config = FunnelConfig.from_json_file(config_path)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    cls = weights.resolve_model_class(config, model_class)
    return config, cls


# --- config vs weights ---------------------------------------------------------------------


def check_config(config: FunnelConfig, shapes: Mapping[str, tuple], cls=None, source="") -> None:
    """Raise ConfigMismatchError naming each config field that disagrees with the tensors."""
    prefix = weights.BACKBONE_PREFIX + "."
    body = {k[len(prefix) :] if k.startswith(prefix) else k: tuple(v) for k, v in shapes.items()}
    problems = []

    def check(field, want, key, got, what):
        if key in body and got is not None and got != want:
            problems.append(f"{field} = {want} but {key} has shape {body[key]} ({what} {got})")

    emb = body.get("embeddings.word_embeddings.weight")
    if emb is not None and len(emb) == 2:
        check("vocab_size", config.vocab_size, "embeddings.word_embeddings.weight", emb[0], "rows")
        check("d_model", config.d_model, "embeddings.word_embeddings.weight", emb[1], "width")
    blocks: dict[int, set[int]] = {}
    for key in body:
        m = re.match(r"encoder\.blocks\.(\d+)\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if blocks:
        n_blocks = max(blocks) + 1
        if n_blocks != config.num_blocks:
            problems.append(
                f"block_sizes = {list(config.block_sizes)} names {config.num_blocks} blocks but "
                f"the weights have {n_blocks} (encoder.blocks.0 .. encoder.blocks.{n_blocks - 1})"
            )
        else:
            for b in range(n_blocks):
                n_layers = max(blocks.get(b, {-1})) + 1
                if n_layers != config.block_sizes[b]:
                    problems.append(
                        f"block_sizes[{b}] = {config.block_sizes[b]} but the weights have "
                        f"{n_layers} layers in block {b} (encoder.blocks.{b}.*)"
                    )

    def first(suffix):  # prefer the encoder's first layer in messages
        keys = sorted((k for k in body if k.endswith(suffix)), key=lambda k: (k[0] != "e", k))
        return keys[0] if keys else None

    attn = first("q_head.weight")
    attn = None if attn is None else attn[: -len("q_head.weight")]
    if attn is not None:
        q = body[attn + "q_head.weight"]
        nh = config.n_head * config.d_head
        if len(q) == 2 and q[0] != nh:
            problems.append(
                f"n_head * d_head = {config.n_head} * {config.d_head} = {nh} but "
                f"{attn}q_head.weight has shape {q} ({q[0]} outputs)"
            )
        rw = body.get(attn + "r_w_bias")
        if rw is not None and len(rw) == 2:
            check("n_head", config.n_head, attn + "r_w_bias", rw[0], "heads")
            check("d_head", config.d_head, attn + "r_w_bias", rw[1], "head size")
    ff = first("ffn.linear_1.weight")
    if ff is not None and len(body[ff]) == 2:
        check("d_inner", config.d_inner, ff, body[ff][0], "rows")
    layers = {int(m.group(1)) for k in body if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    if layers and max(layers) + 1 != config.num_decoder_layers:
        problems.append(
            f"num_decoder_layers = {config.num_decoder_layers} but the weights have "
            f"{max(layers) + 1} (decoder.layers.*)"
        )
    head_keys = {
        FunnelForSequenceClassification: "classifier.linear_out.weight",
        FunnelForTokenClassification: "classifier.weight",
        FunnelForQuestionAnswering: "qa_outputs.weight",
    }
    if cls in head_keys and head_keys[cls] in body and len(body[head_keys[cls]]) == 2:
        check("num_labels", config.num_labels, head_keys[cls], body[head_keys[cls]][0], "rows")
    if problems:
        where = f" ({source})" if source else ""
        raise ConfigMismatchError(
            f"the config does not match the weights{where}: " + "; ".join(problems)
        )


# --- conversion ----------------------------------------------------------------------------


def load_flax(
    src,
    config_path=None,
    model_class: str | None = None,
    dtype=None,
    progress: bool = False,
    rng=None,
    **hub_options,
):
    """Read a `transformers` checkpoint into `(module, params, weights folder)`, in memory.

    `hub_options` (revision, cache_dir, local_files_only, token) apply when SRC is a Hub id.
    """
    files, config_path, folder = find_weights(src, config_path, **hub_options)
    config, cls = load_config(config_path, model_class)
    param_dtype = jnp.float32 if dtype is None else dtype
    module = cls(config=config, dtype=param_dtype, param_dtype=param_dtype)
    state_dict = LazyStateDict(files, progress=progress)
    check_config(
        config,
        state_dict.shapes(),
        cls,
        source=f"{config_path} vs {', '.join(str(f) for f in files)}",
    )
    try:
        params = weights.state_dict_to_params(
            state_dict,
            module,
            rng=rng if rng is not None else jax.random.PRNGKey(0),
            dtype=param_dtype,
        )
    except WeightsError as e:
        raise WeightsError(f"{', '.join(str(f) for f in files)}: {e}") from None
    finally:
        state_dict.close()
    return module, params, folder


def convert(
    src,
    dst,
    config_path=None,
    model_class: str | None = None,
    dtype=None,
    overwrite: bool = False,
    progress: bool = True,
    **hub_options,
) -> Path:
    """Convert SRC (a path or a Hub id) into the Orbax model directory DST (atomically).

    `hub_options` (revision, cache_dir, local_files_only, token) apply when SRC is a Hub id.
    Returns DST.
    """
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    module, params, folder = load_flax(
        src, config_path, model_class, dtype, progress, **hub_options
    )
    extra = [folder / name for name in checkpoint.TOKENIZER_FILES if (folder / name).is_file()]
    checkpoint.save_model_dir(dst, module, params, extra_files=extra, overwrite=overwrite)
    return dst


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.torch_to_orbax",
        description="Convert a transformers Funnel checkpoint into an Orbax model directory.",
    )
    p.add_argument(
        "src",
        help="transformers directory, shard index, state-dict file, or a Hugging Face Hub id",
    )
    p.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--config", help="config.json (default: the one beside the weights)")
    p.add_argument("--model-class", help="class to convert into (default: config architectures)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--no-progress", action="store_true", help="no per-tensor progress bar")
    add_hub_arguments(p)
    return p


def add_hub_arguments(p: argparse.ArgumentParser) -> None:
    """--revision, --cache-dir, --local-files-only, --token: for a SRC that is a Hub id."""
    g = p.add_argument_group("Hugging Face Hub (when SRC is a Hub id)")
    g.add_argument("--revision", help="branch, tag or commit (default: main)")
    g.add_argument("--cache-dir", help="Hub cache directory (default: HF_HUB_CACHE)")
    g.add_argument(
        "--local-files-only",
        action="store_true",
        help="use the cache only, no network (as HF_HUB_OFFLINE=1)",
    )
    g.add_argument("--token", help="Hub token for private/gated repositories (default: HF_TOKEN)")


def hub_options(args: argparse.Namespace) -> dict:
    """The hub keyword arguments of parsed add_hub_arguments flags."""
    return {
        "revision": args.revision,
        "cache_dir": args.cache_dir,
        "local_files_only": args.local_files_only,
        "token": args.token,
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dst = convert(
            args.src,
            args.dst,
            config_path=args.config,
            model_class=args.model_class,
            dtype=DTYPES[args.dtype],
            overwrite=args.overwrite,
            progress=not args.no_progress,
            **hub_options(args),
        )
    except (WeightsError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
