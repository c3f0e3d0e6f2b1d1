"""Per-step metrics: each stage's typed record of a step (a ``StepMetrics`` subclass, returned in
the stage's result) and its JSON line in ``RUN_DIR/metrics.jsonl`` (for people and
``heed train plot``; code reads the returned records, never the file)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class StepMetrics:
    """One step's metrics: its number and wall-clock time; a stage's subclass adds the rest."""

    step: int
    time: float

    def row(self) -> dict[str, Any]:
        """The JSON line: every metric that was measured at this step (None ones left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class MetricsWriter:
    """Appends one JSON object per step; on a resume, drops steps past ``after``."""

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

    def write(self, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(metrics.row()) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics file (for plots and people)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
