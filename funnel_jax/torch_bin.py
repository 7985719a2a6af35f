"""Read a PyTorch state-dict file (`pytorch_model.bin`) into numpy arrays without torch.

Many released checkpoints (the `funnel-transformer/*` ones among them) ship only
`pytorch_model.bin`. Both formats `torch.save` writes are read:

- the zip format (torch >= 1.6): `<root>/data.pkl` pickles the dict, each tensor pointing at a
  storage `<root>/data/<key>` (raw little-endian elements);
- the legacy format: magic number, protocol, system info, the pickled dict, the list of storage
  keys, then each storage as an int64 element count followed by its bytes.

The unpickler accepts only what a state dict of tensors needs (tensor rebuilds, storage types,
OrderedDict); anything else is refused with its name, as `torch.load(weights_only=True)` does.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch.<Name>Storage -> element dtype.
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class TorchBinError(ValueError):
    """A file that is not a readable PyTorch state dict: the message names the file."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *args):
    """torch._utils._rebuild_tensor_v2: a view of `storage` (a 1-D numpy array)."""
    if storage is None:  # a first pass over the legacy format, storages not read yet
        return None
    size, stride = tuple(size), tuple(stride)
    if not size:
        return storage[offset].copy()
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, *args):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, load_storage):
        super().__init__(file)
        self.path = path
        self.load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchBinError(
            f"{self.path}: {module}.{name} is not part of a state dict of tensors (refused)"
        )

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view metadata])
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchBinError(f"{self.path}: unknown persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise TorchBinError(f"{self.path}: unknown storage type {storage_type!r}")
        return self.load_storage(key, storage_type.dtype)


def _check_state_dict(obj, path: Path) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TorchBinError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, np.ndarray | np.generic)]
    if bad:
        raise TorchBinError(f"{path}: entries that are not tensors: {', '.join(bad)}")
    return {str(k): np.asarray(v) for k, v in obj.items()}


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if len(pickles) != 1:
            raise TorchBinError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        names = set(zf.namelist())
        if root + "byteorder" in names and zf.read(root + "byteorder").strip() != b"little":
            raise TorchBinError(f"{path}: big-endian tensors are not supported")
        cache: dict[str, np.ndarray] = {}

        def load_storage(key, dtype):
            if key not in cache:
                member = f"{root}data/{key}"
                if member not in names:
                    raise TorchBinError(f"{path}: storage {member} missing from the archive")
                cache[key] = np.frombuffer(zf.read(member), dtype=dtype)
            return cache[key]

        obj = _Unpickler(io.BytesIO(zf.read(pickles[0])), path, load_storage).load()
    return _check_state_dict(obj, path)


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())

    def skip(key, dtype):
        return None

    def plain_load():
        return _Unpickler(stream, path, skip).load()

    if plain_load() != _LEGACY_MAGIC:
        raise TorchBinError(f"{path}: not a PyTorch file (neither a zip archive nor legacy magic)")
    plain_load()  # protocol version
    plain_load()  # system info
    # The storages follow the pickled dict: pass over it once to find them, then load it again.
    dict_start = stream.tell()
    dtypes: dict[str, np.dtype] = {}

    def record(key, dtype):
        dtypes[key] = np.dtype(dtype)

    _Unpickler(stream, path, record).load()
    keys = plain_load()
    storages = {}
    for key in keys:
        key = str(key)
        dtype = dtypes.get(key, np.dtype(np.uint8))
        (numel,) = struct.unpack("<q", stream.read(8))
        raw = stream.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise TorchBinError(f"{path}: truncated (storage {key})")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    stream.seek(dict_start)

    def load_storage(key, dtype):
        if key not in storages:
            raise TorchBinError(f"{path}: storage {key} missing from the file")
        return storages[key]

    return _check_state_dict(_Unpickler(stream, path, load_storage).load(), path)


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a `torch.save`d state dict, as numpy arrays (bfloat16 as ml_dtypes)."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _read_zip(path)
        return _read_legacy(path)
    except TorchBinError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, struct.error, KeyError) as e:
        raise TorchBinError(f"{path}: cannot read PyTorch file, truncated or corrupt? ({e})") from e
    except OSError as e:
        raise TorchBinError(f"{path}: cannot read ({e})") from None
