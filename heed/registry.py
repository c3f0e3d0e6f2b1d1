"""The policy registry: versioned Hugging Face policy folders, each with a manifest.

This is the contract between the trainer (which publishes) and the server (which serves); both
import it from here. A version is published atomically: its files are written to a hidden folder
beside the registry, fsynced, checksummed into ``manifest.json``, then renamed into place, so a
reader sees a whole version or none. A folder whose files do not match its manifest's sha256
sums is never served (``verify`` raises).

    registry = PolicyRegistry(DataDir(data_dir).registry)
    manifest = registry.publish(folder, parent="v1", watermark=812, data={...}, evaluation={...})
    folder = registry.verify(manifest.version)           # raises CorruptVersion on any mismatch
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from heed.datadir import fsync_dir

MANIFEST = "manifest.json"
# Where a version came from: a base model entered by `heed serve`, a trainer round, or by hand.
VersionSource = Literal["import", "trainer", "manual"]
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Files a policy folder needs to be served; anything else in it is checksummed too.
_REQUIRED = ("config.json",)


class RegistryError(Exception):
    """Base of the registry's errors."""


class UnknownVersion(RegistryError):
    """No published version of that name."""


class CorruptVersion(RegistryError):
    """A version's files do not match its manifest (missing, changed, or extra weights)."""


@dataclass(frozen=True)
class Manifest:
    """What a version is, where it came from, what it was trained on and how it evaluated."""

    version: str
    sequence: int  # publication order, 1 for the first version
    parent: str | None
    created: float
    files: dict[str, str]  # relative path -> sha256
    watermark: int = 0  # the event-log position its training data reached
    data: dict[str, Any] = field(default_factory=dict)  # counts of what it was trained on
    evaluation: dict[str, Any] = field(default_factory=dict)
    source: VersionSource | Literal[""] = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(**data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


class PolicyRegistry:
    """A folder of published versions: ``ROOT/VERSION/{config.json, *.safetensors, ..., manifest.json}``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- reading ---------------------------------------------------------------------------
    def versions(self) -> list[Manifest]:
        """Every published version, oldest first (folders being written are not listed)."""
        found = []
        for child in self.root.iterdir():
            if child.name.startswith(".") or not (child / MANIFEST).is_file():
                continue
            try:
                found.append(self.manifest(child.name))
            except (RegistryError, ValueError, TypeError):
                continue  # an unreadable manifest is not a published version
        return sorted(found, key=lambda m: m.sequence)

    def manifest(self, version: str) -> Manifest:
        path = self.root / version / MANIFEST
        if not _VERSION.match(version) or not path.is_file():
            raise UnknownVersion(f"no published policy version {version!r} in {self.root}")
        return Manifest.from_json(json.loads(path.read_text()))

    def path(self, version: str) -> Path:
        self.manifest(version)
        return self.root / version

    def latest(self) -> Manifest | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def verify(self, version: str) -> Path:
        """The version's folder, after checking every file against the manifest's sha256."""
        manifest = self.manifest(version)
        folder = self.root / version
        present = {str(p.relative_to(folder)) for p in _files(folder)}
        missing = sorted(set(manifest.files) - present)
        extra = sorted(present - set(manifest.files))
        if missing or extra:
            raise CorruptVersion(f"{version}: files missing {missing} or not in the manifest {extra}")
        for name, expected in manifest.files.items():
            if sha256_file(folder / name) != expected:
                raise CorruptVersion(f"{version}: {name} does not match its sha256 in the manifest")
        return folder

    # ---- publishing ------------------------------------------------------------------------
    def next_version(self) -> str:
        """``v<N>`` for the next publication (N = the next sequence number), unused so far."""
        n = self._next_sequence()
        while (self.root / f"v{n}").exists():
            n += 1
        return f"v{n}"

    def _next_sequence(self) -> int:
        latest = self.latest()
        return (latest.sequence if latest else 0) + 1

    def publish(
        self,
        folder: Path,
        *,
        version: str | None = None,
        parent: str | None = None,
        watermark: int = 0,
        data: dict[str, Any] | None = None,
        evaluation: dict[str, Any] | None = None,
        source: VersionSource = "manual",
    ) -> Manifest:
        """Copy ``folder`` in as a new version: write aside, fsync, checksum, rename into place."""
        folder = Path(folder)
        for name in _REQUIRED:
            if not (folder / name).is_file():
                raise RegistryError(f"{folder} is not a Hugging Face model folder (no {name})")
        version = version or self.next_version()
        if not _VERSION.match(version):
            raise RegistryError(f"invalid version name {version!r}: letters, digits, '.', '_' and '-' only")
        dest = self.root / version
        if dest.exists():
            raise RegistryError(f"version {version} is already published")
        # The writer's pid in the name: remove_stale() leaves a live writer's folder alone.
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".publishing-{os.getpid()}-{version}-"))
        try:
            files: dict[str, str] = {}
            for src in _files(folder):
                rel = src.relative_to(folder)
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
                with open(target, "rb") as fh:
                    os.fsync(fh.fileno())
                files[str(rel)] = sha256_file(target)
            manifest = Manifest(
                version=version,
                sequence=self._next_sequence(),
                parent=parent,
                created=time.time(),
                files=files,
                watermark=watermark,
                data=dict(data or {}),
                evaluation=dict(evaluation or {}),
                source=source,
            )
            with open(tmp / MANIFEST, "w") as fh:
                json.dump(manifest.to_json(), fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, dest)  # atomic: readers see the whole version or nothing
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return manifest

    def import_base(self, folder: Path, version: str) -> Manifest:
        """Publish a base model under ``version`` once; a no-op when that version is already there."""
        try:
            return self.manifest(version)
        except UnknownVersion:
            pass
        try:
            return self.publish(folder, version=version, source="import")
        except (RegistryError, OSError) as exc:  # another replica sharing the registry entered it first?
            try:
                return self.manifest(version)
            except UnknownVersion:
                raise exc from None

    def remove_stale(self) -> None:
        """Delete folders left by publications whose process died mid-copy (not live ones)."""
        for child in self.root.iterdir():
            if not child.name.startswith(".publishing-"):
                continue
            pid = child.name.removeprefix(".publishing-").split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            shutil.rmtree(child, ignore_errors=True)
