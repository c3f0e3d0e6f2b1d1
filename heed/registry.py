"""The policy registry: versioned Hugging Face policy folders, each with a manifest.

This is the contract between the trainer (which publishes) and the server (which serves); both
import it from here. A version is published atomically: its files are written to a hidden folder
beside the registry, fsynced, checksummed into ``manifest.json``, then renamed into place, so a
reader sees a whole version or none. A folder whose files do not match its manifest's sha256
sums is never served (``verify`` raises).

    registry = PolicyRegistry(DataDir(data_dir).registry)
    manifest = registry.publish(folder, parent="v1", watermark=812, data={...}, evaluation={...})
    folder = registry.verify(manifest.version)           # raises CorruptVersion on any mismatch

A version is in one of two modes. ``full``: a whole model folder. ``adapter``: a peft LoRA
adapter (``adapter_config.json``, ``adapter_model.safetensors``) on the weights of a ``full``
version, its ``base``, whose files' sha256s the manifest copies at publication; the adapter is
served only on exactly those weights (``verify`` checks the base's manifest still says so).

    adapter = registry.publish(ppo_out / "adapter", mode="adapter", base="SmolLM2-135M-Instruct", parent="v2")

Every round publishes a version, so the trainer prunes its own old ones (``prune``): a pruned
version's folder is renamed aside (readers stop seeing it at once), its manifest is kept in
``.pruned/`` for the record, and its files are deleted.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from heed.datadir import atomic_write_file, fsync_dir

MANIFEST = "manifest.json"
PRUNED = ".pruned"  # the manifests of pruned versions: ROOT/.pruned/VERSION.json
PRUNE_GRACE_S = 3600.0  # a version published or verified this recently is not pruned
_ASIDE = (".publishing-", ".pruning-")  # + the writer's pid: a folder being written or deleted
# Where a version came from: a base model entered by `heed serve`, a trainer round, or by hand.
VersionSource = Literal["import", "trainer", "manual"]
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Files a policy folder needs to be served, by mode; anything else in it is checksummed too.
PolicyMode = Literal["full", "adapter"]
_REQUIRED: dict[str, tuple[str, ...]] = {
    "full": ("config.json",),
    "adapter": ("adapter_config.json", "adapter_model.safetensors"),
}
# The layers an adapter may change: the decoder's linear projections. Not the embeddings or the
# output layer, which the bundled model ties together (and vLLM would not serve them changed).
ADAPTER_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def lora_engine_args(max_rank: int, max_loras: int, max_cpu_loras: int) -> dict[str, Any]:
    """vLLM's engine arguments to serve adapters of this contract (the server's engine in
    adapter mode, the trainer's rollout engine for a LoRA policy): only the ``ADAPTER_TARGETS``
    are wrapped, so the output layer (tied to the embedding in the bundled model) stays as it is
    and is not gathered per sampled token (docs/design/adapter-mode.md)."""
    return {
        "enable_lora": True,
        "max_lora_rank": max_rank,
        "max_loras": max_loras,
        "max_cpu_loras": max_cpu_loras,
        "lora_target_modules": sorted(ADAPTER_TARGETS),
    }


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
    mode: PolicyMode = "full"
    base: str | None = None  # adapter: the full version whose weights it sits on
    base_files: dict[str, str] = field(default_factory=dict)  # adapter: the base's sha256s when published
    adapter: dict[str, Any] = field(default_factory=dict)  # adapter: format, r, lora_alpha, target_modules

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.mode == "full":  # a full version's manifest as heed wrote it before modes: older heeds read it
            for key in _ADAPTER_FIELDS:
                data.pop(key)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})  # a newer heed's fields: ignored


_ADAPTER_FIELDS = ("mode", "base", "base_files", "adapter")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_text(text: str, path: Path) -> None:
    path.write_text(text)


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
            if _VERSION.match(version) and (self.root / PRUNED / f"{version}.json").is_file():
                raise UnknownVersion(
                    f"policy version {version!r} was pruned from {self.root} (its manifest: {PRUNED}/{version}.json)"
                )
            raise UnknownVersion(f"no published policy version {version!r} in {self.root}")
        return Manifest.from_json(json.loads(path.read_text()))

    def pruned(self) -> list[Manifest]:
        """The manifests of the versions ``prune`` removed, oldest first."""
        found = []
        for path in sorted((self.root / PRUNED).glob("*.json")):
            try:
                found.append(Manifest.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(found, key=lambda m: m.sequence)

    def path(self, version: str) -> Path:
        self.manifest(version)
        return self.root / version

    def size(self, version: str) -> int:
        """Bytes on disk of a published version's files."""
        return sum(p.stat().st_size for p in _files(self.path(version)))

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
        if manifest.mode == "adapter":
            problem = adapter_fits(manifest, self._base_manifest(manifest))
            if problem:
                raise CorruptVersion(f"{version}: {problem}")
        with contextlib.suppress(OSError):  # a read-only registry: the grace below is then publication's
            os.utime(folder)  # "in use lately": prune() leaves it alone for PRUNE_GRACE_S
        return folder

    def verify_full(self, version: str) -> Path:
        """``verify`` for a reader that loads whole models (a full-weight server): an adapter
        version is refused with what to do instead."""
        manifest = self.manifest(version)
        if manifest.mode != "full":
            raise RegistryError(full_versions_only(version, manifest.base))
        return self.verify(version)

    def verify_for(self, version: str, mode: PolicyMode) -> Path:
        """``verify`` for a server serving versions in ``mode``: in adapter mode any version (its
        engine checks that it fits its base), in full mode full versions only (``verify_full``)."""
        return self.verify(version) if mode == "adapter" else self.verify_full(version)

    def _base_manifest(self, adapter: Manifest) -> Manifest | None:
        try:
            return self.manifest(adapter.base) if adapter.base else None
        except UnknownVersion:
            return None
        except (ValueError, TypeError) as exc:
            raise CorruptVersion(f"{adapter.version}'s base {adapter.base} has an unreadable manifest: {exc}") from None

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
        mode: PolicyMode = "full",
        base: str | None = None,
    ) -> Manifest:
        """Copy ``folder`` in as a new version: write aside, fsync, checksum, rename into place.
        ``mode="adapter"``: ``folder`` is a peft LoRA adapter on the full version ``base``."""
        folder = Path(folder)
        if mode not in _REQUIRED:
            raise RegistryError(f"unknown policy mode {mode!r}: full or adapter")
        for name in _REQUIRED[mode]:
            if not (folder / name).is_file():
                kind = "Hugging Face model" if mode == "full" else "peft adapter"
                raise RegistryError(f"{folder} is not a {kind} folder (no {name})")
        adapter: dict[str, Any] = {}
        base_files: dict[str, str] = {}
        if mode == "adapter":
            if not base:
                raise RegistryError("an adapter needs the full version it sits on (base)")
            base_manifest = self.manifest(base)
            if base_manifest.mode != "full":
                raise RegistryError(f"base {base} is an adapter itself; an adapter's base must be a full version")
            adapter = adapter_summary(folder)
            base_files = dict(base_manifest.files)
        elif base is not None:
            raise RegistryError("a full version has no base")
        version = version or self.next_version()
        if not _VERSION.match(version):
            raise RegistryError(f"invalid version name {version!r}: letters, digits, '.', '_' and '-' only")
        dest = self.root / version
        if dest.exists():
            raise RegistryError(f"version {version} is already published")
        if (self.root / PRUNED / f"{version}.json").exists():  # the log's records of it name the old one
            raise RegistryError(f"version {version} was published before and pruned; choose another name")
        # The writer's pid in the name: remove_stale() leaves a live writer's folder alone.
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".publishing-{os.getpid()}-{version}-"))
        try:
            files: dict[str, str] = {}
            for src in _files(folder):
                rel = src.relative_to(folder)
                if mode == "adapter" and str(rel) == "README.md":
                    continue  # peft's model card template: not part of the adapter
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
                mode=mode,
                base=base,
                base_files=base_files,
                adapter=adapter,
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
        """Delete folders left by publications or prunings whose process died midway (not live ones)."""
        for child in self.root.iterdir():
            prefix = next((p for p in _ASIDE if child.name.startswith(p)), None)
            if prefix is None:
                continue
            pid = child.name.removeprefix(prefix).split("-", 1)[0]
            if pid.isdigit() and _alive(int(pid)):
                continue
            shutil.rmtree(child, ignore_errors=True)

    # ---- pruning ---------------------------------------------------------------------------
    def prunable(self, keep: int, protect: Iterable[str] = (), after_sequence: int | None = None) -> list[Manifest]:
        """The versions ``prune`` would remove, oldest first: versions the trainer published,
        except its newest ``keep``, those in ``protect`` (what the rollout serves or may go back
        to), those published after ``after_sequence`` (not yet taken up by a server), those
        published or verified (a server loading it, a round starting from it) in the last
        ``PRUNE_GRACE_S``, and the base of any adapter that stays. Imported and manually
        published versions always stay."""
        if keep < 1:
            raise RegistryError(f"keep must be at least 1 (the newest version); got {keep}")
        versions = self.versions()
        trainers = [m for m in versions if m.source == "trainer"]
        stays = {m.version for m in versions if m.source != "trainer"} | set(protect)
        stays |= {m.version for m in trainers[-keep:]}
        if after_sequence is not None:
            stays |= {m.version for m in versions if m.sequence > after_sequence}
        stays |= {m.version for m in versions if self._used_lately(m.version)}
        stays |= {m.base for m in versions if m.version in stays and m.base}
        return [m for m in versions if m.version not in stays]

    def _used_lately(self, version: str) -> bool:
        try:
            return time.time() - (self.root / version).stat().st_mtime < PRUNE_GRACE_S
        except OSError:
            return False

    def prune(self, keep: int, protect: Iterable[str] = (), after_sequence: int | None = None) -> list[Manifest]:
        """Remove ``prunable(keep, protect, after_sequence)``; returns what was removed."""
        return self.remove(self.prunable(keep, protect, after_sequence))

    def remove(self, versions: Iterable[Manifest]) -> list[Manifest]:
        """Remove ``versions`` (what ``prunable`` chose); returns those removed. Each folder is
        first renamed aside, so no reader finds half of it; a pruner that dies midway leaves a
        hidden folder that ``remove_stale`` deletes."""
        removed = []
        for manifest in versions:  # .pruned/ made by the first record
            folder = self.root / manifest.version
            aside = self.root / f".pruning-{os.getpid()}-{manifest.version}"
            try:
                os.rename(folder, aside)
            except FileNotFoundError:  # pruned meanwhile by another process
                continue
            fsync_dir(self.root)
            record = json.dumps({**manifest.to_json(), "pruned": time.time()}, indent=2, sort_keys=True)
            atomic_write_file(self.root / PRUNED / f"{manifest.version}.json", functools.partial(_write_text, record))
            shutil.rmtree(aside, ignore_errors=True)
            removed.append(manifest)
        return removed


def adapter_summary(folder: Path) -> dict[str, Any]:
    """What the registry records of a peft LoRA adapter folder; raises RegistryError for an adapter
    heed cannot serve (vLLM serves LoRA without biases, DoRA or extra saved modules)."""
    try:
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{folder}: unreadable adapter_config.json ({exc})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise RegistryError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA is served")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    problems = []
    if config.get("bias", "none") != "none":
        problems.append(f"bias {config['bias']!r} (only 'none')")
    if config.get("use_dora"):
        problems.append("DoRA")
    if config.get("lora_bias"):
        problems.append("lora_bias")
    if config.get("init_lora_weights", True) not in (True, "gaussian"):  # PiSSA, OLoRA, LoftQ: they change the base
        problems.append(f"init_lora_weights {config['init_lora_weights']!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-module ranks or alphas (rank_pattern, alpha_pattern)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    outside = sorted(set(targets) - ADAPTER_TARGETS)
    if outside or not targets:
        problems.append(f"target_modules {outside or targets} (only {', '.join(sorted(ADAPTER_TARGETS))})")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"rank {rank!r}")
    if problems:
        raise RegistryError(f"{folder}: an adapter heed cannot serve: {'; '.join(problems)}")
    return {"format": "peft", "r": rank, "lora_alpha": config.get("lora_alpha", rank), "target_modules": targets}


def adapter_fits(adapter: Manifest, base: Manifest | None) -> str | None:
    """Why ``adapter`` cannot be served on ``base`` (its base's manifest), or None when it can."""
    if adapter.mode != "adapter":
        return f"{adapter.version} is a full version, not an adapter"
    if base is None:
        return f"{adapter.version}'s base {adapter.base} is not in the registry"
    if base.version != adapter.base:
        return f"{adapter.version} sits on {adapter.base}, not on {base.version}"
    if base.mode != "full":
        return f"{adapter.version}'s base {base.version} is not a full version"
    if base.files != adapter.base_files:
        return f"{adapter.version}'s base {base.version} has changed since the adapter was published (sha256s differ)"
    return None


def full_versions_only(version: str, base: str | None) -> str:
    """Why a server that serves full versions refuses the adapter ``version``, and what to do."""
    return (
        f"{version} is a LoRA adapter on {base}, and this server serves full versions: publish its full-weight"
        f" model with `heed registry merge {version}` and use that version"
    )
