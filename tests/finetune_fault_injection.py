"""Run `experiments.finetune` with the test hooks of tests/fault_injection.py (a helper of
tests/test_finetune_reliability.py; not part of the package).

    FUNNEL_TEST_STEP_SLEEP=0.05 python tests/finetune_fault_injection.py FINETUNE ARGS...

FUNNEL_TEST_SAVE_STEP / _MARKER / _SLEEP hold the first checkpoint write of a step >= N open
(see tests/fault_injection.py). FUNNEL_TEST_STEP_SLEEP pauses that many seconds after each
training step (the tiny test model trains a step in milliseconds), so that a test can send a
signal while the run is at a step it chooses; the computation is unchanged. Without the
variables this is `python -m experiments.finetune`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fault_injection import _install_hook  # noqa: E402


def _slow_steps() -> None:
    pause = float(os.environ.get("FUNNEL_TEST_STEP_SLEEP", "0"))
    if pause <= 0:
        return
    from funnel_jax import train_state

    jit_train_step = train_state.jit_train_step

    def slow_jit_train_step(*args, **kwargs):
        step_fn = jit_train_step(*args, **kwargs)

        def slow_step(state, batch):
            out = step_fn(state, batch)
            time.sleep(pause)
            return out

        return slow_step

    train_state.jit_train_step = slow_jit_train_step


if __name__ == "__main__":
    _install_hook()
    _slow_steps()
    from experiments import finetune

    sys.exit(finetune.main(sys.argv[1:]))
