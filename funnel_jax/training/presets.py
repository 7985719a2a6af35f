"""The shipped presets (configs/pretrain, configs/finetune, configs/models), found through
importlib.resources so that an installed wheel finds them from any working directory.

    path = preset_path("pretrain", "tiny")      # a file path, e.g. .../configs/pretrain/tiny.json
    names = preset_names("models")              # ["intermediate", "intermediate-base", ...]
"""

from __future__ import annotations

import contextlib
import importlib.resources
from pathlib import Path

KINDS = ("pretrain", "finetune", "models")
_keep_open = contextlib.ExitStack()  # zip installs: the extracted files live as long as we do


def preset_dir(kind: str) -> Path:
    """The directory of the presets of `kind` (one of KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown preset kind {kind!r}; expected one of {KINDS}")
    try:
        root = importlib.resources.files("configs") / kind
    except ModuleNotFoundError:
        # A source checkout run from elsewhere, or an editable install made before configs/
        # became a package: the directory beside funnel_jax/.
        return Path(__file__).resolve().parents[2] / "configs" / kind
    return Path(_keep_open.enter_context(importlib.resources.as_file(root)))


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in preset_dir(kind).glob("*.json"))


def preset_path(kind: str, name: str) -> Path | None:
    """The file of preset `name` (with or without .json) of `kind`, or None when absent."""
    stem = name[: -len(".json")] if name.endswith(".json") else name
    path = preset_dir(kind) / f"{stem}.json"
    return path if path.is_file() else None
