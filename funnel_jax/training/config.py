"""Typed settings of the training runs and the one restart check.

Every section is a frozen dataclass; a field that a restart may change without breaking the
bit-identical resume carries `metadata={"restart_may_change": True}` (see `restart_field`).
`config_diff(saved, now, may_change)` lists the dotted names whose values differ, which the
entry points use to refuse a restart with other settings, naming the field.

    cfg = PretrainConfig.from_dict(json_dict)        # model objective optimizer data train
    cfg.to_dict()                                    # the run_config.json layout
    config_diff(saved_dict, cfg.to_dict(), restart_may_change(PretrainConfig))
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from funnel_jax.training.files import ConfigError

RESTART_KEY = "restart_may_change"


def restart_field(default: Any) -> Any:
    """A dataclass field a restart may change (intervals, logging, how many checkpoints)."""
    return dataclasses.field(default=default, metadata={RESTART_KEY: True})


def restart_may_change(cls, prefix: str = "") -> set[str]:
    """Dotted names of the fields of `cls` (and of its dataclass-typed sections) marked with
    `restart_field`, e.g. {"train.log_every", "train.save_every", ...}."""
    out = set()
    hints = _section_types(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if f.metadata.get(RESTART_KEY):
            out.add(name)
        elif f.name in hints:
            out |= restart_may_change(hints[f.name], prefix=f"{name}.")
    return out


def _section_types(cls) -> dict[str, type]:
    return getattr(cls, "SECTION_TYPES", {})


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: Mapping, now: Mapping, may_change: Iterable[str] = ()) -> list[str]:
    """'name: saved X, now Y' for every dotted name whose value differs between two settings
    trees (compared as JSON reads them back), except the names in `may_change` and below."""
    may_change = tuple(may_change)
    now = json.loads(json.dumps(now))  # tuples -> lists, int keys -> str
    saved = json.loads(json.dumps(saved))

    def kept(name: str) -> bool:
        return not any(name == m or name.startswith(m + ".") for m in may_change)

    a = {k: v for k, v in _flatten(saved).items() if kept(k)}
    b = {k: v for k, v in _flatten(now).items() if kept(k)}
    missing = "(absent)"
    return [
        f"{k}: saved {a.get(k, missing)!r}, now {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def _from_section(cls, d: Mapping | None, section: str):
    """`cls(**d)`, naming the unknown keys of section `section`."""
    d = dict(d or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError(f"unknown {section} setting(s) {unknown}; expected {sorted(names)}")
    return cls(**d)


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- pretraining


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
    """Packed-sequence data of a pretraining run (`data` section)."""

    seq_len: int = 128
    batch_size: int = 16  # global batch
    vocab_size: int = 6000  # WordPiece vocabulary trained when no tokenizer is given
    lowercase: bool = True
    random_next_prob: float = 0.5
    eval_fraction: float = 0.05  # documents held out for evaluation
    eval_batches: int = 8
    # Train shards of the prepared data (--corpus and the default; None: 1). The batches do
    # not depend on the number of processes.
    num_shards: int | None = None
    # Worker processes that pack --corpus (0: the training process); the prepared files do
    # not depend on it.
    prepare_workers: int = restart_field(0)

    def check(self) -> None:
        for key in ("seq_len", "batch_size", "vocab_size", "eval_batches"):
            _positive_int(getattr(self, key), f"data.{key}")
        w = self.prepare_workers
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ConfigError(f"data.prepare_workers must be an integer >= 0, got {w!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction must be in (0, 1), got {self.eval_fraction!r}")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Length, seed, precision and the periodic work of a run (`train` section)."""

    steps: int = 300
    seed: int = 0
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (params stay float32)
    log_every: int = restart_field(10)
    save_every: int = restart_field(100)
    keep_checkpoints: int = restart_field(3)
    eval_every: int = restart_field(0)  # 0: evaluate at the start and the end only
    max_consecutive_skips: int = restart_field(10)  # stop after this many non-finite steps
    async_checkpointing: bool = restart_field(True)  # saves overlap the next steps

    def check(self) -> None:
        for key in ("steps", "log_every", "save_every", "keep_checkpoints"):
            _positive_int(getattr(self, key), f"train.{key}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"train.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"train.eval_every must be an integer >= 0, got {self.eval_every!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: the sections of configs/pretrain/*.json plus the inputs and the mesh.

    model: FunnelConfig fields (or "preset": a name in configs/models/), objective:
    ObjectiveConfig fields, optimizer: OptimizerConfig fields (checked when the run starts,
    where the tokenizer gives the vocabulary size).
    """

    SECTION_TYPES = {"data": PretrainDataConfig, "train": LoopConfig}
    SECTIONS = ("model", "objective", "optimizer", "data", "train")

    model: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    objective: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)
    train: LoopConfig = dataclasses.field(default_factory=LoopConfig)
    corpus: tuple[str, ...] | None = None  # files / dirs; None: the embedded stdlib corpus
    tokenizer: str | None = None  # an existing tokenizer directory; None: train one
    # A prepared directory (experiments.prepare_data): its shards, its tokenizer; no corpus.
    data_dir: str | None = None
    # Device mesh ("data=2,fsdp=2,tensor=2"); None: data parallel over several devices.
    mesh: str | None = restart_field(None)
    config_file: str | None = restart_field(None)  # where the settings came from

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PretrainConfig:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)} - {"_config_file"})
        if unknown:
            raise ConfigError(f"unknown section(s) {unknown}; expected {list(cls.SECTIONS)}")
        corpus = d.get("corpus")
        return cls(
            model=dict(d.get("model") or {}),
            objective=dict(d.get("objective") or {}),
            optimizer=dict(d.get("optimizer") or {}),
            data=_from_section(PretrainDataConfig, d.get("data"), "data"),
            train=_from_section(LoopConfig, d.get("train"), "train"),
            corpus=None if corpus is None else tuple(str(p) for p in corpus),
            tokenizer=d.get("tokenizer"),
            data_dir=d.get("data_dir"),
            mesh=d.get("mesh"),
            config_file=d.get("config_file", d.get("_config_file")),
        )

    def to_dict(self) -> dict[str, Any]:
        """The run_config.json layout (plain JSON types)."""
        out = {s: dict(getattr(self, s)) for s in ("model", "objective", "optimizer")}
        out["data"] = dataclasses.asdict(self.data)
        out["train"] = dataclasses.asdict(self.train)
        out["corpus"] = None if self.corpus is None else list(self.corpus)
        out["tokenizer"] = self.tokenizer
        if self.data_dir is not None:  # absent otherwise: older run dirs still resume
            out["data_dir"] = self.data_dir
        out["mesh"] = self.mesh
        out["_config_file"] = self.config_file
        return out

    def replace(self, **changes) -> PretrainConfig:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        self.data.check()
        self.train.check()
        if self.data_dir is not None and (self.corpus or self.tokenizer):
            given = "--corpus" if self.corpus else "--tokenizer"
            raise ConfigError(
                f"--data {self.data_dir} holds the examples and their tokenizer; {given} cannot "
                "be given with it"
            )


def pretrain_restart_may_change() -> set[str]:
    """What a restart of a pretraining run may change (run_config.json names)."""
    return restart_may_change(PretrainConfig) | {"_config_file", "config_file"}


# --------------------------------------------------------------------------- fine-tuning


@dataclasses.dataclass(frozen=True)
class FinetuneDataConfig:
    """Where the task's examples come from (`data` section; see docs/finetuning.md)."""

    data_dir: str | None = None  # the task's files (train.tsv, dev.tsv, ...)
    train_file: str | None = None  # overrides the one in data_dir
    dev_file: str | None = None  # overrides the one(s) in data_dir
    text_column: str | None = None  # classification / regression tables
    text_pair_column: str | None = None
    label_column: str | None = None
    labels: tuple[str, ...] | None = None  # the label set (default: those of the train set)
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    skip_malformed_lines: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneModelConfig:
    """The starting point (`model` section): a pretrained `init` directory, or `model_config`
    (a file or a configs/models name) from scratch; `tokenizer` overrides the init's."""

    init: str | None = None
    tokenizer: str | None = None
    model_config: str | None = None


@dataclasses.dataclass(frozen=True)
class FinetuneLoopConfig:
    """Periodic work of a fine-tuning run (`loop` section); all may change on a restart."""

    log_every: int = restart_field(10)
    save_every: int = restart_field(500)  # 0: only at the end and on SIGTERM / SIGINT
    max_consecutive_skips: int = restart_field(10)
    async_checkpointing: bool = restart_field(True)  # training saves overlap the next steps

    def check(self) -> None:
        if isinstance(self.save_every, bool) or self.save_every < 0:
            raise ConfigError(f"save-every must be >= 0 (got {self.save_every})")
        if self.log_every < 1:
            raise ConfigError(f"log-every must be a positive integer (got {self.log_every})")
        if not isinstance(self.async_checkpointing, bool):
            raise ConfigError(
                f"loop.async_checkpointing must be true or false (got {self.async_checkpointing!r})"
            )
        if self.max_consecutive_skips < 1:
            raise ConfigError(
                "max-consecutive-skips must be a positive integer (got "
                f"{self.max_consecutive_skips})"
            )


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run. `settings`: the resolved hyper-parameters (funnel_jax.training.
    finetune.DEFAULTS keys: built-in defaults < the task's preset < what was given)."""

    SECTION_TYPES = {
        "data": FinetuneDataConfig,
        "model": FinetuneModelConfig,
        "loop": FinetuneLoopConfig,
    }

    task: str
    settings: Mapping[str, Any]
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    model: FinetuneModelConfig = dataclasses.field(default_factory=FinetuneModelConfig)
    loop: FinetuneLoopConfig = dataclasses.field(default_factory=FinetuneLoopConfig)
    preset: str | None = None  # the preset file the settings came from
    mesh: str | None = restart_field(None)
    overwrite_output_dir: bool = restart_field(False)

    def replace(self, **changes) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)
