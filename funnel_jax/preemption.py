"""Graceful preemption: SIGTERM / SIGINT become a "stop after this step" request.

    stopper = PreemptionHandler().install()
    try:
        for ...:
            state, metrics = train_step(state, batch)
            step += 1
            if stopper.should_stop(step):
                break                      # then save a checkpoint of `step` and wait for it
    finally:
        stopper.uninstall()

The signal handler only sets a flag (no exception is raised inside a step or a checkpoint
write); the training loop reads it once per step. A second SIGINT (Ctrl-C twice) restores the
default behaviour and raises KeyboardInterrupt at once.

With several processes (jax.distributed) every process must save the checkpoint (Orbax saves
are collective), so they must agree on the step at which they stop: every `sync_every` steps
the flags are all-gathered (a tiny collective) and any process's request stops all of them at
that same step. On a single process the flag is read every step at no cost (no device sync).

`exit_code()` is the conventional 128 + signal number (143 for SIGTERM, 130 for SIGINT), so a
scheduler sees the job as interrupted (not finished) and can requeue it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Turns the given signals into a stop request read by `should_stop(step)`."""

    def __init__(self, signals=DEFAULT_SIGNALS, sync_every: int = 10, verbose: bool = True):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.signals = tuple(signals)
        self.sync_every = sync_every
        self.verbose = verbose  # print a line when a signal arrives (process 0 only)
        self.signum: int | None = None  # the first signal received
        self._event = threading.Event()
        self._previous: dict[int, object] = {}
        self._process_count: int | None = None

    # ---------------------------------------------------------------- handler

    def _handle(self, signum, frame) -> None:
        if self._event.is_set() and signum == signal.SIGINT:
            # Second Ctrl-C: the user wants out now.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
        self._event.set()
        if not self.verbose:
            return
        try:
            name = signal.Signals(signum).name
            os.write(
                sys.stderr.fileno(),
                f"\n{name} received: stopping after the current step with a checkpoint\n".encode(),
            )
        except (OSError, ValueError):
            pass

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only; elsewhere this is a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ---------------------------------------------------------------- queries

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as a signal would (for tests and in-process callers)."""
        if self.signum is None:
            self.signum = signum
        self._event.set()

    @property
    def requested(self) -> bool:
        """Whether this process received a stop request."""
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step` (call it once per step, on all processes)."""
        if self._process_count is None:
            import jax

            self._process_count = jax.process_count()
        if self._process_count == 1:
            return self._event.is_set()
        if step % self.sync_every:
            return False
        import numpy as np
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self._event.is_set()))
        stop = bool(np.any(flags))
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another process was signalled
        return stop

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def exit_code(self) -> int:
        """128 + the signal number (0 when no signal was received)."""
        return 0 if self.signum is None else 128 + int(self.signum)


def exit_code_of(result) -> int:
    """Exit status of a command whose run() returned `result`: 128 + signal number when it
    stopped on a signal (`result["signal"]` = "SIGTERM" / "SIGINT"), else 0."""
    name = result.get("signal") if isinstance(result, dict) else None
    return 128 + int(signal.Signals[name]) if name else 0


# ------------------------------------------------------------------ leftovers of killed runs

_LEFTOVER = re.compile(
    r"(^\d+\.orbax-checkpoint-tmp.*$)|(^\..+\.(tmp|old)-[^/]+$)|(^.+\.json\.tmp$)"
)


def remove_leftovers(
    out_dir: str | os.PathLike, subdirs: tuple[str, ...] = ("checkpoints",)
) -> list[Path]:
    """Remove what a killed run leaves behind in `out_dir` and its checkpoint directories
    `out_dir/<subdir>`: unfinished Orbax step directories (`<step>.orbax-checkpoint-tmp*`),
    unfinished or replaced atomic directories (`.final.tmp-*`, `.final.old-*`,
    `.tokenizer.tmp-*`) and JSON files (`*.json.tmp`). They are never read (Orbax lists only
    finalised steps; the others are renamed into place only when complete), so this only frees
    disk space. Call it on process 0 before the checkpointers are created."""
    removed = []
    for d in (Path(out_dir), *(Path(out_dir) / s for s in subdirs)):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _LEFTOVER.match(p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed
