"""The loss-curve plot and the printed summary of a pretraining run."""

from __future__ import annotations

import math
from pathlib import Path

from funnel_jax.training.run_log import read_metrics


def plot_losses(metrics_path: Path, png_path: Path, objective: str) -> None:
    # A Figure of its own (no pyplot): the caller's backend (a notebook's inline one) is kept.
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("split") == "train"]
    evals = [r for r in rows if r.get("split") == "eval"]
    panels = [("loss", "total loss"), ("mlm_loss", "MLM loss"), ("mlm_acc", "MLM accuracy")]
    if objective == "electra":
        panels += [("disc_loss", "discriminator loss"), ("disc_acc", "RTD accuracy")]
        panels += [("rtd_auc", "RTD AUC (eval)")]
    cols = 3
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels, strict=False):
        xs = [r["step"] for r in train if key in r]
        if xs:
            ax.plot(xs, [r[key] for r in train if key in r], label="train", lw=1)
        ex = [r["step"] for r in evals if key in r]
        if ex:
            ax.plot(ex, [r[key] for r in evals if key in r], "o-", label="eval", ms=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if xs or ex:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


SUMMARY_ROWS = (
    ("mlm_loss", "generator MLM loss", "{:.3f}"),
    ("mlm_acc", "generator MLM accuracy", "{:.3f}"),
    ("disc_loss", "discriminator loss", "{:.4f}"),
    ("disc_acc", "RTD accuracy", "{:.3f}"),
    ("rtd_auc", "RTD AUC", "{:.3f}"),
    ("replaced_frac", "replaced tokens", "{:.3f}"),
)


def format_summary(summary: dict) -> str:
    start, end = summary["start"], summary["end"]
    lines = [f"{'held-out eval':<26}{'step 0':>10}{'step ' + str(summary['steps']):>12}"]
    lines.append("-" * len(lines[0]))
    for key, label, fmt in SUMMARY_ROWS:
        if key not in end:
            continue
        if summary["objective"] == "mlm" and key.startswith("mlm"):
            label = label.replace("generator ", "")
        lines.append(
            f"{label:<26}{fmt.format(start.get(key, float('nan'))):>10}{fmt.format(end[key]):>12}"
        )
    lines.append("-" * len(lines[0]))
    took = f"{summary['wall_time_s']:.0f} s"
    if summary.get("resumed_from"):
        took += f" (since the resume at step {summary['resumed_from']})"
    lines.append(
        f"took {took}, {summary.get('tokens_per_s', 0):.0f} tokens/s in training; "
        f"final model in {summary['final_dir']}"
    )
    return "\n".join(lines)
