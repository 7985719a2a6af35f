"""Checks of a run's inputs before training starts, and guards while it runs.

Every failure raises a `RunError` subclass whose message names what is wrong and what to do:

    InputError              a bad setting or input (also a ValueError)
    OutputDirError          --output-dir cannot be created or written
    CheckpointWriteError    a checkpoint could not be written (disk full, ...); the message
                            names the newest complete checkpoint, which is left intact
    TooManySkippedSteps     `train.max_consecutive_skips` steps in a row had non-finite
                            gradients; the message names the steps

The checks already done elsewhere (corpus files: funnel_jax.data.CorpusError; token ids:
data.validate_token_ids; model vs. tokenizer vocabulary and sequence length:
funnel_jax.training.pretraining.resolve_settings; checkpoint tree:
checkpoint.CheckpointMismatchError) are not repeated here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path


class RunError(Exception):
    """An error a user can act on; command-line entry points print it without a traceback."""


class InputError(RunError, ValueError):
    """A setting or an input that cannot be used."""


class OutputDirError(InputError):
    """The output directory cannot be created or written."""


class CheckpointWriteError(RunError, OSError):
    """A checkpoint could not be written; the previous ones are intact."""


class TooManySkippedSteps(RunError, RuntimeError):
    """Too many consecutive steps had non-finite gradients."""


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types a command-line entry point reports as `error: ...` (exit status 2)
    instead of a traceback: RunError and the input errors of the other modules."""
    from funnel_jax.checkpoint import CheckpointMismatchError
    from funnel_jax.data import CorpusError
    from funnel_jax.hub import HubError
    from funnel_jax.prepare import PrepareError

    return (RunError, CorpusError, CheckpointMismatchError, HubError, PrepareError)


# --------------------------------------------------------------------------- settings


def check_pretrain_settings(cfg: Mapping) -> None:
    """Contradictions between sections of a pretraining run config (the per-field checks are
    in funnel_jax.training.pretraining.check_pretrain_config)."""
    train, opt = cfg["train"], cfg.get("optimizer", {})
    limit = train.get("max_consecutive_skips", 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"train.max_consecutive_skips must be a positive integer, got {limit!r}")
    total = opt.get("total_steps") or train["steps"]
    warmup = opt.get("warmup_steps", 0)
    if isinstance(warmup, int) and not isinstance(warmup, bool) and warmup > total:
        where = "optimizer.total_steps" if opt.get("total_steps") else "train.steps"
        raise InputError(
            f"optimizer.warmup_steps={warmup} is longer than the learning-rate schedule "
            f"({where}={total}): the learning rate would never reach its peak nor decay; lower "
            "optimizer.warmup_steps or raise the number of steps"
        )


# --------------------------------------------------------------------------- output directory


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it writable (write, fsync and remove a probe file);
    raise OutputDirError naming the directory and the reason otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "the disk is full"
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            reason += f" ({blocker} is a file, not a directory)"
        raise OutputDirError(
            f"--output-dir {path}: cannot create or write it: {reason}; choose another "
            "--output-dir or fix its permissions"
        ) from e
    return path


# --------------------------------------------------------------------------- checkpoint writes


@contextlib.contextmanager
def checkpoint_write(directory: str | os.PathLike, step: int, good_steps: Iterable[int]):
    """Turn an OSError raised while writing the checkpoint of `step` into a CheckpointWriteError
    that says why (disk full, ...) and which checkpoint is still good. `good_steps`: the
    complete checkpoints before this save (evaluated before the write starts)."""
    good = sorted(int(s) for s in good_steps if int(s) != int(step))
    try:
        yield
    except OSError as e:
        if isinstance(e, CheckpointWriteError):
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        why = "the disk is full" if full else (e.strerror or str(e))
        kept = (
            f"the newest complete checkpoint is step {good[-1]} in {directory}; it is intact and "
            "a restart resumes from it"
            if good
            else f"no complete checkpoint exists yet in {directory}"
        )
        fix = "free some disk space, then rerun" if full else "fix the problem, then rerun"
        err = CheckpointWriteError(
            f"could not write the checkpoint of step {step}: {why} ({e}); {kept}; {fix} the "
            "same command"
        )
        err.errno = e.errno
        raise err from e


# --------------------------------------------------------------------------- non-finite guard


class SkipGuard:
    """Counts consecutive skipped (non-finite) steps from the per-step `skipped` metrics, which
    the loop fetches anyway for logging: exact, and no extra host sync.

        guard = SkipGuard(limit=10)
        guard.update(first_step, [m["skipped"] for m in fetched_rows])   # raises past the limit
    """

    def __init__(self, limit: int, setting: str = "train.max_consecutive_skips"):
        self.limit = int(limit)
        self.setting = setting  # how the user sets the limit, for the message
        self.streak = 0  # consecutive skipped steps ending at the last step seen
        self.total = 0

    def update(self, first_step: int, skipped: Iterable, now: int | None = None) -> None:
        """`skipped[i]` is the 0/1 metric of step `first_step + i`; `now`: the step the run has
        reached (default: the last one given)."""
        skipped = [float(s) for s in skipped]
        now = first_step + len(skipped) - 1 if now is None else now
        for i, s in enumerate(skipped):
            if s:
                self.streak += 1
                self.total += 1
                if self.streak >= self.limit:
                    step = first_step + i
                    detected = f" (detected at step {now})" if now != step else ""
                    raise TooManySkippedSteps(
                        f"steps {step - self.streak + 1}..{step}: {self.streak} consecutive steps "
                        "had a non-finite loss or gradients (their updates were skipped; "
                        f"{self.setting}={self.limit}); the run stopped at step "
                        f"{step}{detected} without saving. The newest checkpoint was kept: lower "
                        "the learning rate, use float32, or check the data before resuming"
                    )
            else:
                self.streak = 0
