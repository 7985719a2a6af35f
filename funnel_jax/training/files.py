"""Small file helpers of the training entry points (standard library only at import time)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class ConfigError(ValueError):
    """A settings file, preset or command-line setting that cannot be used."""


def load_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; ConfigError naming the file and line if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON through a temporary file renamed onto `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def save_tokenizer_atomic(tokenizer, tok_dir: str | os.PathLike) -> None:
    """tokenizer.save_pretrained into a hidden temporary sibling renamed onto `tok_dir` when
    complete (a kill leaves the old directory or none, never a partial one)."""
    from funnel_jax.checkpoint import atomic_directory

    with atomic_directory(tok_dir, overwrite=True) as tmp:
        tokenizer.save_pretrained(tmp)
