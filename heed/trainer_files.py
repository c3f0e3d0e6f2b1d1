"""The trainer's files, the contract between the trainer (which writes them) and whoever shows
its work (`heed trainer status`, the web dashboard): ``DATA_DIR/trainer/state.json`` and one
report per round in ``DATA_DIR/trainer/rounds/round-NNNN.json``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from heed.datadir import DataDir, atomic_write_json


@dataclass(frozen=True)
class TrainerFiles:
    """Where the trainer keeps its things: ``DATA_DIR/trainer/``."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> TrainerFiles:
        """The trainer's files in the data directory ``data_dir``."""
        return cls(DataDir(data_dir).trainer)

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def work(self) -> Path:  # a round's scratch space; whatever is here at start is a killed round's
        return self.root / "work"

    @property
    def reward_models(self) -> Path:
        return self.root / "rm"

    def round_running(self) -> bool:
        """A round's work folder exists: a round is under way (or a killed one awaits clean-up)."""
        return any(self.work.glob("round-*"))

    def report(self, round_: int) -> Path:
        return self.root / "rounds" / f"round-{round_:04d}.json"

    def write_report(self, round_: int, report: dict[str, Any]) -> None:
        atomic_write_json(self.report(round_), report)

    def report_paths(self) -> list[Path]:
        """The round reports' files, oldest first (round-10000 after round-9999)."""
        return sorted((self.root / "rounds").glob("round-*.json"), key=_round_number)

    def reports(self, last: int | None = None) -> list[dict[str, Any]]:
        """The round reports, oldest first (the ``last`` ones only, when given)."""
        paths = self.report_paths()
        if last is not None:
            paths = paths[-last:] if last > 0 else []
        return [json.loads(path.read_text()) for path in paths]


def _round_number(path: Path) -> int:
    digits = path.stem.removeprefix("round-")
    return int(digits) if digits.isdigit() else -1


@dataclass(frozen=True)
class TrainerState:
    """What survives a restart. ``watermark`` is the log position the last completed round read
    up to; ``pending_watermark`` is the one the round in progress reads up to."""

    watermark: int = 0
    round: int = 0  # rounds completed (published or rejected)
    feedback: float = 0.0  # the feedback the last round's data held, weighed as the round threshold weighs it
    reward_model: str | None = None  # the current reward model, relative to DATA_DIR/trainer
    versions: tuple[str, ...] = ()  # versions this trainer published
    pending_watermark: int | None = None

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        data["versions"] = tuple(data.get("versions", ()))
        if "feedback" not in data and "comparisons" in data:  # a state written before thumbs counted
            data["feedback"] = float(data["comparisons"])
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def save(self, path: Path) -> None:
        atomic_write_json(path, {**asdict(self), "versions": list(self.versions), "updated": time.time()})
