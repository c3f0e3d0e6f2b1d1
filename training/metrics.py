"""Per-step metrics as JSON lines (``RUN_DIR/metrics.jsonl``), one object per step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsWriter:
    """Appends ``{"step": N, "time": ..., name: value...}``; on a resume, drops steps past ``after``."""

    def __init__(self, path: Path, enabled: bool = True, after: int | None = None) -> None:
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if after is None:
            path.write_text("")
        elif path.exists():  # keep the history up to the checkpoint the run resumes from
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= after]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
