"""Metrics of a run: metrics.jsonl (one JSON row per log / eval) and TensorBoard events.

A restart drops the rows written after the checkpoint it resumes from, so that the file of a
resumed run equals an uninterrupted run's (except timings).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class NullLog:
    """What processes other than 0 write: nothing."""

    def write(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for k in rows[0]:
        vals = [float(r[k]) for r in rows]
        out[k] = sum(vals) if k == "skipped" else sum(vals) / len(vals)
    return out


class MetricsLog:
    """metrics.jsonl + TensorBoard; a restart drops the lines written after its checkpoint."""

    def __init__(self, out_dir: Path, start_step: int, final_step: int):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a kill
                    step = row.get("step", 0)
                    end_eval = row.get("split") == "eval" and step == final_step and step > 0
                    if step <= start_step and not end_eval:
                        kept.append(line if line.endswith("\n") else line + "\n")
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 or None)
        except ImportError:  # pragma: no cover
            print("warning: tensorboardX not installed; no TensorBoard events", file=sys.stderr)
            self.tb = None

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        row = {"step": int(step), "split": split, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows
