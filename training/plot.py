"""``heed train plot RUN_DIR``: every metric of RUN_DIR/metrics.jsonl against the step, one PNG."""

from __future__ import annotations

import math
from pathlib import Path

from training.metrics import read_metrics


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw one small panel per numeric metric; returns the PNG's path (default RUN_DIR/metrics.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'} has no rows")
    names = sorted({k for r in rows for k, v in r.items() if isinstance(v, int | float) and k not in ("step", "time")})
    cols = min(3, len(names))
    lines = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 2.8 * lines), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        points = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=10)
    fig.tight_layout()
    dest = out or run_dir / "metrics.png"
    fig.savefig(dest, dpi=100)
    plt.close(fig)
    return dest
