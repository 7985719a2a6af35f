"""Run `experiments.pretrain` with a test hook that holds a checkpoint write open (a helper of
tests/test_reliability.py; not part of the package).

    FUNNEL_TEST_SAVE_STEP=N FUNNEL_TEST_SAVE_MARKER=/path/marker FUNNEL_TEST_SAVE_SLEEP=30 \\
        python tests/fault_injection.py PRETRAIN ARGS...

The first training-checkpoint save of a step >= N pauses for FUNNEL_TEST_SAVE_SLEEP seconds in
the middle of the Orbax write (the step's `<step>.orbax-checkpoint-tmp-*` directory exists, the
`state` item's write has begun, `extra`'s has not, nothing is finalised) after writing the step
number into the marker file, so that the test can SIGKILL the process at that exact moment. Without
the variables this is `python -m experiments.pretrain`.

    FUNNEL_TEST_ASYNC_HOLD_STEP=N FUNNEL_TEST_SAVE_MARKER=... FUNNEL_TEST_SAVE_SLEEP=60 ...

instead holds the write of the `extra` item of the first save of a step >= N inside Orbax's
commit (the background thread of an async save, so the training steps go on meanwhile).

    FUNNEL_TEST_PREPARE_MARKER=/path/marker FUNNEL_TEST_SAVE_SLEEP=60 ...

holds the preparation of `--corpus` (into `<output-dir>/.data.partial`) at its first packed
chunk, after writing the marker file.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write_marker(path: Path, text: str) -> None:
    """Write the marker whole, then make it appear (a test polls for it and reads it at once)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _wait_for_tmp_dir(checkpoints: Path, step: int, timeout: float = 120.0) -> None:
    """Wait until Orbax has made the step's `<step>.orbax-checkpoint-tmp-*` directory.

    Orbax creates it in a background thread while the items' writes start (its default
    `create_directories_asynchronously`), so a held write can begin before the directory the
    test looks for exists.
    """
    t0 = time.time()
    while not any(checkpoints.glob(f"{step}.orbax-checkpoint-tmp*")):
        if time.time() - t0 > timeout:
            raise RuntimeError(
                f"no {step}.orbax-checkpoint-tmp* in {checkpoints} after {timeout} s"
            )
        time.sleep(0.01)


def _track_saves() -> dict:
    """Record the step and directory of each TrainCheckpointer.save in the returned dict."""
    from funnel_jax import checkpoint

    current = {"step": None, "dir": None, "done": False}
    save = checkpoint.TrainCheckpointer.save

    def tracked_save(self, step, *args, **kwargs):
        current["step"], current["dir"] = int(step), self.directory
        return save(self, step, *args, **kwargs)

    checkpoint.TrainCheckpointer.save = tracked_save
    return current


def _install_async_hold() -> None:
    first = os.environ.get("FUNNEL_TEST_ASYNC_HOLD_STEP")
    if first is None:
        return
    import orbax.checkpoint as ocp

    marker = Path(os.environ["FUNNEL_TEST_SAVE_MARKER"])
    pause = float(os.environ.get("FUNNEL_TEST_SAVE_SLEEP", "30"))
    current = _track_saves()

    save_fn = ocp.JsonCheckpointHandler._save_fn

    async def held_save_fn(self, x, directory):
        step = current["step"]
        if not current["done"] and step is not None and step >= int(first):
            current["done"] = True
            _wait_for_tmp_dir(current["dir"], step)
            _write_marker(marker, f"{step} {directory}\n")
            time.sleep(pause)  # blocks the commit thread only
        return await save_fn(self, x, directory)

    ocp.JsonCheckpointHandler._save_fn = held_save_fn


def _install_prepare_hold() -> None:
    marker = os.environ.get("FUNNEL_TEST_PREPARE_MARKER")
    if marker is None:
        return
    from funnel_jax import prepare

    pause = float(os.environ.get("FUNNEL_TEST_SAVE_SLEEP", "30"))
    encode = prepare.encode_examples

    def held_encode(*args, **kwargs):
        _write_marker(Path(marker), "preparing\n")
        time.sleep(pause)
        return encode(*args, **kwargs)

    prepare.encode_examples = held_encode


def _install_hook() -> None:
    _install_async_hold()
    _install_prepare_hold()
    first = os.environ.get("FUNNEL_TEST_SAVE_STEP")
    if first is None:
        return
    import orbax.checkpoint as ocp

    marker = Path(os.environ["FUNNEL_TEST_SAVE_MARKER"])
    pause = float(os.environ.get("FUNNEL_TEST_SAVE_SLEEP", "30"))
    current = _track_saves()

    def hold(directory) -> None:
        step = current["step"]
        if current["done"] or step is None or step < int(first):
            return
        current["done"] = True
        _wait_for_tmp_dir(current["dir"], step)
        _write_marker(marker, f"{step} {directory}\n")
        time.sleep(pause)

    handler = ocp.JsonCheckpointHandler
    json_save, json_async_save = handler.save, handler.async_save

    def held_save(self, directory, *args, **kwargs):
        hold(directory)
        return json_save(self, directory, *args, **kwargs)

    async def held_async_save(self, directory, *args, **kwargs):
        hold(directory)
        return await json_async_save(self, directory, *args, **kwargs)

    ocp.JsonCheckpointHandler.save = held_save
    ocp.JsonCheckpointHandler.async_save = held_async_save


if __name__ == "__main__":
    _install_hook()
    from experiments import pretrain

    sys.exit(pretrain.main(sys.argv[1:]))
