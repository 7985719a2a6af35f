"""The one training loop of pretraining and fine-tuning.

    result = fit(state, step_fn, batches, Loop(start_step=0, stop_at=100, log_every=10),
                 mesh=mesh, put_batch=put, stopper=stopper, on_log=write_row,
                 hooks=[Hook("eval", every=50, fn=run_eval), Hook("checkpoint", 100, save)])

`fit` owns what both runs share: the mesh and the logical-axis rules in force around every
traced or executed call (the ahead-of-time compilation, each step, each hook), the compile time
(logged), a two-deep device prefetch of the batches, the stop request (SIGTERM / SIGINT through
funnel_jax/preemption.py, read after every step), the non-finite skip guard, the progress bar,
and periodic work as hooks run every `every` steps. The time spent in hooks stays out of the
throughput. The caller keeps what differs: the data, the state's creation and restore, the
final checkpoint and the evaluation / export after the loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from funnel_jax import sharding, validation

logger = logging.getLogger("funnel_jax")


def mesh_context(mesh):
    """The mesh and logical-axis rules in force (a no-op without a mesh)."""
    return contextlib.nullcontext() if mesh is None else sharding.use_mesh(mesh)


@dataclasses.dataclass(frozen=True)
class Hook:
    """Periodic work: `fn(ctx)` after every step that is a multiple of `every` (0: never).

    `below`: only at steps < below. `at`: also at this step. `when_stopping`: also run at a
    step where the loop stops on a signal (False: that work waits for the restart).
    """

    name: str
    every: int
    fn: Callable[[LoopContext], Any]
    below: int | None = None
    at: int | None = None
    when_stopping: bool = True

    def due(self, step: int, stopping: bool) -> bool:
        if stopping and not self.when_stopping:
            return False
        periodic = bool(self.every) and step % self.every == 0
        if self.below is not None and step >= self.below:
            periodic = False
        return periodic or step == self.at


@dataclasses.dataclass(frozen=True)
class Loop:
    """Where the loop starts and stops and how often it logs."""

    start_step: int
    stop_at: int  # the loop ends after this step (or earlier on a signal)
    total_steps: int | None = None  # for the progress bar (default stop_at)
    log_every: int = 10
    max_consecutive_skips: int = 10
    skip_setting: str = "train.max_consecutive_skips"  # how the user sets the limit
    progress: bool = True
    desc: str = "train"


@dataclasses.dataclass
class LoopContext:
    """What hooks and callbacks see: the step reached, its state, the data position after
    the step's batch (`data_state`), and the loop's timings."""

    step: int
    state: Any
    data_state: Any = None
    stopping: bool = False
    compile_s: float = 0.0
    train_time_s: float = 0.0
    items: int = 0  # counted items (tokens, examples) over the timed steps
    skipped: int = 0


class DevicePrefetch:
    """Keeps `depth` batches on the device ahead of the step that takes them.

    Each entry remembers `data_state()` read right after its batch was drawn, so that a
    checkpoint of step k saves the position after batch k, not after the prefetched ones.
    """

    def __init__(self, batches: Iterator, put: Callable, data_state=None, depth: int = 2):
        self._batches = batches
        self._put = put
        self._data_state = data_state
        self._queue: collections.deque = collections.deque()
        self._depth = depth

    def _fill(self, want: int) -> None:
        while len(self._queue) < want:
            host = next(self._batches)
            pos = None if self._data_state is None else self._data_state()
            self._queue.append((host, self._put(host), pos))

    def peek(self):
        self._fill(1)
        return self._queue[0]

    def take(self, remaining: int):
        """(host batch, device batch, data position); keeps up to `depth` more in flight but
        never draws past the `remaining` steps of the loop."""
        self._fill(1)
        item = self._queue.popleft()
        self._fill(min(self._depth, max(remaining - 1, 0)))
        return item


def lower_step(step_fn, state, batch, mesh=None):
    """`step_fn.lower(state, batch)` traced inside the mesh and the logical-axis rules, so that
    the model's `nn.with_logical_constraint` calls become sharding constraints."""
    with mesh_context(mesh):
        return step_fn.lower(state, batch)


def compile_step(step_fn, state, batch, mesh=None):
    """The step compiled ahead of time on (state, batch); (compiled, seconds). A step that is
    not a jitted function (no `.lower`, e.g. a test's wrapper) is returned as it is."""
    if not hasattr(step_fn, "lower"):
        return step_fn, 0.0
    t0 = time.time()
    lowered = lower_step(step_fn, state, batch, mesh)
    with mesh_context(mesh):
        compiled = lowered.compile()
    return compiled, time.time() - t0


def fit(
    state,
    step_fn,
    batches: Iterator,
    loop: Loop,
    *,
    mesh=None,
    put_batch: Callable = lambda b: b,
    data_state: Callable[[], Any] | None = None,
    stopper=None,
    hooks: Sequence[Hook] = (),
    on_log: Callable[[LoopContext, list[dict], float | None], dict | None] | None = None,
    count: Callable[[Any], int] | None = None,
    on_interrupt: Callable[[LoopContext, list[dict]], None] | None = None,
) -> LoopContext:
    """Train from `loop.start_step` to `loop.stop_at` (or a stop request); returns the last
    LoopContext (`stopping` True when a signal stopped it).

    step_fn: a jitted `(state, batch) -> (state, metrics)` (compiled here ahead of time on the
    first batch); metrics hold `skipped`. batches: host batches (e.g. numpy dicts);
    put_batch: host -> device; data_state: the batch iterator's position (saved by hooks).
    on_log(ctx, rows, items_per_s): every log_every steps, at stop_at and on a stop, with the
    fetched metrics rows since the last call; it may return progress-bar fields.
    count(batch): items of a host batch for the throughput. on_interrupt(ctx, rows): a second
    Ctrl-C (KeyboardInterrupt); the context holds the last completed step; re-raised after.
    """
    from tqdm import tqdm

    ctx = LoopContext(step=loop.start_step, state=state)
    if loop.start_step >= loop.stop_at:
        return ctx
    feed = DevicePrefetch(batches, put_batch, data_state)
    _, first, _ = feed.peek()
    compiled, ctx.compile_s = compile_step(step_fn, state, first, mesh)
    logger.info("train step compiled in %.1f s", ctx.compile_s)
    if loop.progress:
        print(f"train step compiled in {ctx.compile_s:.1f} s", flush=True)
    guard = validation.SkipGuard(loop.max_consecutive_skips, setting=loop.skip_setting)
    bar = tqdm(
        total=loop.total_steps or loop.stop_at,
        initial=loop.start_step,
        disable=not loop.progress,
        dynamic_ncols=True,
        desc=loop.desc,
        unit="step",
    )
    pending: list = []
    items, t_log = 0, time.time()
    try:
        while ctx.step < loop.stop_at:
            host, batch, pos = feed.take(loop.stop_at - ctx.step)
            if count is not None:
                items += count(host)
            with mesh_context(mesh):
                state, metrics = compiled(state, batch)
            ctx.state, ctx.data_state = state, pos
            ctx.step += 1
            ctx.stopping = stopper is not None and stopper.should_stop(ctx.step)
            pending.append(metrics)
            bar.update(1)
            if ctx.step % loop.log_every == 0 or ctx.step == loop.stop_at or ctx.stopping:
                rows = jax.device_get(pending)
                pending = []
                guard.update(ctx.step - len(rows) + 1, [r["skipped"] for r in rows])
                ctx.skipped = guard.total
                now = time.time()
                rate = items / max(now - t_log, 1e-9) if count is not None else None
                ctx.items += items
                ctx.train_time_s += now - t_log
                items, t_log = 0, now
                post = on_log(ctx, rows, rate) if on_log is not None else None
                if post:
                    bar.set_postfix(post, refresh=False)
            due = [h for h in hooks if h.due(ctx.step, ctx.stopping)]
            if due:
                jax.block_until_ready(state)  # the training time ends here ...
                t_pause = time.time()
                with mesh_context(mesh):
                    for h in due:
                        h.fn(ctx)
                t_log += time.time() - t_pause  # ... and the pause stays out of the rates
            if ctx.stopping:
                break
    except KeyboardInterrupt:
        bar.close()
        if on_interrupt is not None:
            with mesh_context(mesh):
                on_interrupt(ctx, pending)
        raise
    bar.close()
    return ctx
