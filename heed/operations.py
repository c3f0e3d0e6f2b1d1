"""``heed registry list|show|merge|prune`` (the registry folder) and ``heed rollout
status|canary|promote|rollback|pause|resume`` (calls a running server's admin API)."""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from heed.datadir import (
    EVENT_LOG_DEFAULT,
    EVENT_LOG_HELP,
    REGISTRY_DEFAULT,
    REGISTRY_HELP,
    default_data_dir,
    registry_location,
)
from heed.rollout import RolloutStatus


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    return Path(os.environ.get("HEED_SERVE_DATA_DIR") or default_data_dir())


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {value}")
    return value


def _registry(args: argparse.Namespace) -> Any:
    from heed.registry import PolicyRegistry

    return PolicyRegistry(registry_location(args.registry, _data_dir(args)))


def _registry_list(args: argparse.Namespace) -> int:
    from heed.eventlog import log_location
    from heed.rollout import read_state

    registry = _registry(args)
    versions = registry.versions()
    if args.json:
        print(json.dumps([m.to_json() for m in versions], indent=2))
        return 0
    if not versions:
        print(f"no policy versions in {registry.root}")
        return 0
    data_dir = _data_dir(args)
    state = read_state(log_location(args.event_log, data_dir), data_dir)
    print(f"{'VERSION':<24} {'SEQ':>4} {'PARENT':<24} {'SOURCE':<8} {'MODE':<16} {'WATERMARK':>9} {'CREATED':<19} ROLE")
    for m in versions:
        role = "stable" if m.version == state.stable else "canary" if m.version == state.canary else ""
        mode = f"adapter on {m.base}" if m.mode == "adapter" else m.mode
        print(
            f"{m.version:<24} {m.sequence:>4} {m.parent or '-':<24} {m.source:<8} {mode:<16} {m.watermark:>9} "
            f"{_when(m.created):<19} {role}"
        )
    return 0


def _registry_show(args: argparse.Namespace) -> int:
    from heed.registry import CorruptVersion

    registry = _registry(args)
    manifest = registry.manifest(args.version)
    data = manifest.to_json()
    try:
        registry.verify(args.version)
        data["verified"] = True
    except CorruptVersion as exc:
        data["verified"] = False
        data["verify_error"] = str(exc)
    data["path"] = str(registry.root / args.version)
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0 if data["verified"] else 1


def _registry_prune(args: argparse.Namespace) -> int:
    """Remove the trainer's old versions, as the trainer does after each move of the rollout."""
    from heed.eventlog import log_location, redacted
    from heed.rollout import read_state

    registry = _registry(args)
    data_dir = _data_dir(args)
    event_log = log_location(args.event_log, data_dir)
    state = read_state(event_log, data_dir)
    if state.stable is None:  # the wrong --event-log, or no server yet: what is in use is unknown
        raise ValueError(
            f"no rollout state in {redacted(event_log)}: which versions are served is unknown (--event-log?)"
        )
    which = {"keep": args.keep, "protect": state.in_use(), "after_sequence": state.considered_sequence}
    doomed = registry.prunable(**which)
    sizes = {m.version: _size(registry, m.version) for m in doomed}
    if not args.dry_run:
        doomed = registry.remove(doomed)
    verb = "would remove" if args.dry_run else "removed"
    for m in doomed:
        print(f"{verb} {m.version} ({sizes.get(m.version, 0) / 2**20:.1f} MiB, published {_when(m.created)})")
    total = sum(sizes.get(m.version, 0) for m in doomed) / 2**30
    gone = {m.version for m in doomed}
    kept = ", ".join(m.version for m in registry.versions() if m.version not in gone)
    print(f"{verb} {len(doomed)} version(s), {total:.2f} GiB; {'keeping' if args.dry_run else 'kept'}: {kept}")
    return 0


def _size(registry: Any, version: str) -> int:
    from heed.registry import RegistryError

    try:
        return int(registry.size(version))
    except (OSError, RegistryError):  # pruned meanwhile (by the trainer)
        return 0


def _registry_merge(args: argparse.Namespace) -> int:
    """Publish the full-weight model of an adapter version, for export or a full-mode server."""
    import tempfile

    from heed.registry import RegistryError

    registry = _registry(args)
    manifest = registry.manifest(args.version)
    if manifest.mode != "adapter":
        raise RegistryError(f"{args.version} is already a full version; there is nothing to merge")
    adapter = registry.verify(args.version)
    assert manifest.base is not None  # verify checked it
    base = registry.verify(manifest.base)
    from training.runtime import merge_adapter

    print(f"merging {args.version} (LoRA r {manifest.adapter.get('r')}) into {manifest.base}'s weights ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="heed-merge-") as tmp:
        folder = merge_adapter(base, adapter, Path(tmp) / "merged")
        merged = registry.publish(
            folder,
            version=args.as_version,
            parent=args.version,
            watermark=manifest.watermark,
            data={"merged_from": args.version, "base": manifest.base},
            evaluation=dict(manifest.evaluation),
            source="manual",
        )
    print(f"published {merged.version}: the full-weight model of {args.version} ({registry.root / merged.version})")
    return 0


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    key = args.admin_key or os.environ.get("HEED_ADMIN_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST" else None)
    request = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ValueError(f"{method} {path}: {exc.code} {message}") from None
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach {args.url}: {exc.reason}") from None


def _print_status(status: RolloutStatus) -> None:
    s = status.state
    print(f"stable  {s.stable}")
    if s.canary:
        paused = "  (paused)" if s.paused else ""
        print(f"canary  {s.canary} at {s.canary_share:g}% (step {s.step}){paused}")
    else:
        print("canary  none")
    for slot in status.slots:
        ready = "ready" if slot.ready else "not ready"
        print(f"slot    {slot.name}: {slot.policy_version} ({ready}{', swapping' if slot.swapping else ''})")
    if status.evidence:
        print("evidence", json.dumps(status.evidence))
    print("history:")
    for d in s.history[-10:]:
        print(f"  {_when(d.time)}  {d.action:<15} {d.version or '-':<20} {d.by:<12} {d.reason}")


def _rollout(args: argparse.Namespace) -> int:
    action = args.rollout_command
    if action == "status":
        data = _admin_call(args, "GET", "/admin/rollout")
    elif action == "canary":
        data = _admin_call(args, "POST", "/admin/rollout/canary", {"version": args.version})
    else:
        data = _admin_call(args, "POST", f"/admin/rollout/{action}")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_status(RolloutStatus.from_json(data))
    return 0


def register(commands: Any) -> None:
    """Add ``heed registry ...`` and ``heed rollout ...`` to the ``heed`` command's subparsers."""
    registry = commands.add_parser("registry", help="list, inspect, merge and prune published policy versions")
    registry_commands = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    for name, help_text, run in (
        ("list", "every published version, oldest first, with its role", _registry_list),
        ("show", "one version's manifest, after verifying its checksums", _registry_show),
        ("merge", "publish an adapter version's full-weight model as a new version", _registry_merge),
        (
            "prune",
            "remove the trainer's older versions (never stable, the canary, the previous stable, a version not yet"
            " taken up, an adapter's base, or an imported or manual version); their manifests stay in .pruned/",
            _registry_prune,
        ),
    ):
        sub = registry_commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--data-dir", type=Path, default=None, help="the service's data directory")
        sub.add_argument("--registry", default=REGISTRY_DEFAULT, help=REGISTRY_HELP)
        if name == "show":
            sub.add_argument("version", help="a published version, e.g. v2")
        elif name == "merge":
            sub.add_argument("version", help="a published adapter version, e.g. v3")
            sub.add_argument(
                "--as", dest="as_version", default=None, help="the new version's name (default: the next vN)"
            )
        elif name == "prune":
            sub.add_argument("--keep", type=_at_least_one, required=True, help="the trainer's newest versions to keep")
            sub.add_argument("--dry-run", action="store_true", help="only say what would be removed")
            sub.add_argument("--event-log", default=EVENT_LOG_DEFAULT, help=EVENT_LOG_HELP + " (for the rollout state)")
        else:
            sub.add_argument("--json", action="store_true", help="print the manifests as JSON")
            sub.add_argument("--event-log", default=EVENT_LOG_DEFAULT, help=EVENT_LOG_HELP + " (for the roles)")
        sub.set_defaults(run=run)

    rollout = commands.add_parser("rollout", help="see and steer the canary rollout of a running server")
    rollout_commands = rollout.add_subparsers(dest="rollout_command", metavar="ACTION", required=True)
    for name, help_text in (
        ("status", "stable and canary versions, the canary's share, evidence and decisions"),
        ("canary", "put a published version into the canary slot and start its rollout"),
        ("promote", "make the canary stable now (the stable slot takes its weights)"),
        ("rollback", "end the canary now (its slot returns to stable's weights)"),
        ("pause", "stop the controller from advancing or rolling back"),
        ("resume", "let the controller decide again"),
    ):
        sub = rollout_commands.add_parser(name, help=help_text, description=help_text)
        if name == "canary":
            sub.add_argument("version", help="a published version, e.g. v3")
        sub.add_argument("--url", default=os.environ.get("HEED_URL", "http://127.0.0.1:8000"), help="the server")
        sub.add_argument("--admin-key", default=None, help="an admin key (default: $HEED_ADMIN_KEY)")
        sub.add_argument("--timeout", type=float, default=600, help="seconds to wait for the server")
        sub.add_argument("--json", action="store_true", help="print the status as JSON")
        sub.set_defaults(run=_rollout)
