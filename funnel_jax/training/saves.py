"""Training checkpoints one at a time, synchronous or async, for pretraining and fine-tuning.

    saves = TrainingSaves(TrainCheckpointer(dir, async_save=True), on_complete=prune)
    saves.start(step, state, extra={"data": position})  # returns once the arrays are copied
    ...                                                  # the next steps run meanwhile
    saves.finish()                                       # blocks until it is complete

Orbax writes each save into a temporary directory renamed when complete, so a save cut short
(SIGKILL, disk full) is never listed or read back. `finish` names a failed write like a
synchronous one (validation.CheckpointWriteError: which step, why, which checkpoint is intact).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from funnel_jax import validation


class TrainingSaves:
    """At most one save in flight over `ckpt` (a funnel_jax.checkpoint.TrainCheckpointer).

    `on_complete(info)`: called once a save is known to be complete, with the keyword
    arguments its `start` was given as `info` (e.g. what that checkpoint refers to).
    """

    def __init__(self, ckpt, on_complete: Callable[[dict], Any] | None = None):
        self.ckpt = ckpt
        self.on_complete = on_complete
        self._in_flight: dict | None = None  # step, the complete steps before it, info

    def start(self, step: int, state, extra: dict, **info) -> None:
        """Save `state` and `extra` at `step`, after the save before it is complete (a failed
        previous save raises here). Synchronous checkpointers finish before returning."""
        self.finish()
        good = self.ckpt.all_steps()
        with validation.checkpoint_write(self.ckpt.directory, step, good):
            self.ckpt.save(step, state, extra=extra)
        self._in_flight = {"step": int(step), "good": good, "info": info}
        if not self.ckpt.async_save:
            self.finish()

    def finish(self) -> None:
        """Block until the save in flight (if any) is complete."""
        if self._in_flight is None:
            return
        flight, self._in_flight = self._in_flight, None
        with validation.checkpoint_write(self.ckpt.directory, flight["step"], flight["good"]):
            self.ckpt.wait()
        if self.on_complete is not None:
            self.on_complete(flight["info"])

    def save_last(self, step: int, save: Callable[[], None], when: bool = True) -> None:
        """The save that ends a run (its end, a stop, an interrupt): the save in flight
        completes, then `save()` runs unless the newest checkpoint is of `step` already (or
        `when` is false), and completes before this returns: the process may then exit."""
        self.finish()
        if when and self.ckpt.latest_step() != step:
            save()
        self.finish()

    def finish_after_error(self) -> None:
        """On the way out of a failed run: let the save in flight complete, ignoring errors
        (the run's own error is the one to report)."""
        with contextlib.suppress(Exception):
            self.finish()
