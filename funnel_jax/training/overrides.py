"""`--set SECTION.KEY=VALUE` overrides, shared by the pretraining and fine-tuning commands.

    apply_overrides({"optimizer": {"learning_rate": 1e-3}}, ["optimizer.learning_rate=5e-4"],
                    sections=("model", "optimizer"))   # -> {"optimizer": {"learning_rate": 5e-4}}

VALUE is parsed as JSON (numbers, true/false/null, lists, objects), else taken as a string.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from typing import Any

from funnel_jax.training.files import ConfigError


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_override(item: str, sections: Sequence[str]) -> tuple[str, str, Any]:
    """'optimizer.learning_rate=5e-4' -> ('optimizer', 'learning_rate', 0.0005)."""
    key, sep, value = item.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
    if section not in sections:
        raise ConfigError(
            f"--set {item!r}: unknown section {section!r}; expected {tuple(sections)}"
        )
    return section, name, parse_value(value)


def apply_overrides(cfg: dict, overrides: Iterable[str], sections: Sequence[str]) -> dict:
    """A copy of the nested dict `cfg` with every override applied in order."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        section, name, value = parse_override(item, sections)
        cfg.setdefault(section, {})[name] = value
    return cfg


def add_set_argument(parser, example: str) -> None:
    """The `--set SECTION.KEY=VALUE ...` flag of both commands (repeatable, applied in order)."""
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override any setting (VALUE: JSON, else a string), e.g. --set {example}",
    )
