"""The policy registry publishes whole versions atomically and refuses any whose files changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from heed.registry import CorruptVersion, PolicyRegistry, RegistryError, UnknownVersion
from heed.rollout import RolloutState, decision, save_state


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    folder = tmp_path / "policy"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "sub" / "extra.txt").write_text("tokenizer bits")
    return folder


def test_publish_writes_a_manifest_with_lineage_data_and_checksums(tmp_path: Path, policy: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    base = registry.import_base(policy, "base")
    v2 = registry.publish(policy, parent="base", watermark=42, data={"comparisons": 7}, evaluation={"win_rate": 0.6})

    assert (base.version, base.sequence, base.source) == ("base", 1, "import")
    assert (v2.version, v2.sequence, v2.parent, v2.watermark) == ("v2", 2, "base", 42)
    assert v2.data == {"comparisons": 7} and v2.evaluation == {"win_rate": 0.6}
    assert set(v2.files) == {"config.json", "model.safetensors", "sub/extra.txt"}
    assert all(len(digest) == 64 for digest in v2.files.values())
    assert [m.version for m in registry.versions()] == ["base", "v2"]
    assert registry.verify("v2") == registry.root / "v2"
    assert registry.import_base(policy, "base") == base  # importing again is a no-op


@pytest.mark.parametrize("damage", ["changed", "missing", "extra"])
def test_a_version_whose_files_do_not_match_its_manifest_is_refused(tmp_path: Path, policy: Path, damage: str) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    folder = registry.root / registry.publish(policy).version
    weights = folder / "model.safetensors"
    if damage == "changed":
        data = bytearray(weights.read_bytes())
        data[100] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "missing":
        weights.unlink()
    else:
        (folder / "model-00002.safetensors").write_bytes(b"smuggled")
    with pytest.raises(CorruptVersion):
        registry.verify(folder.name)


def test_an_interrupted_publication_is_never_listed(tmp_path: Path, policy: Path, monkeypatch) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    import heed.registry as module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module.os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        registry.publish(policy)
    monkeypatch.undo()
    assert registry.versions() == [] and registry.latest() is None
    with pytest.raises(UnknownVersion):
        registry.verify("v1")
    assert registry.publish(policy).version == "v1"


def test_bad_inputs_are_refused_with_clear_errors(tmp_path: Path, policy: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    with pytest.raises(RegistryError, match="not a Hugging Face model folder"):
        registry.publish(tmp_path)
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.publish(policy, version="../escape")
    registry.publish(policy, version="v1")
    with pytest.raises(RegistryError, match="already published"):
        registry.publish(policy, version="v1")
    with pytest.raises(UnknownVersion):
        registry.manifest("../v1")


def test_heed_registry_list_and_show(tmp_path: Path, policy: Path) -> None:
    data_dir = tmp_path / "data"
    registry = PolicyRegistry(data_dir / "registry")
    registry.import_base(policy, "base")
    registry.publish(policy, parent="base", watermark=9)
    registry.publish(lora_adapter(tmp_path / "adapter"), parent="v2", mode="adapter", base="base")

    def heed(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "heed", *args], capture_output=True, text=True, timeout=120)

    listed = heed("registry", "list", "--data-dir", str(data_dir))
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["base", "v2", "v3"] and rows[1][2] == "base"
    assert rows[1][4] == "full" and rows[2][4:7] == ["adapter", "on", "base"]

    shown = heed("registry", "show", "v2", "--data-dir", str(data_dir))
    assert shown.returncode == 0 and json.loads(shown.stdout)["verified"] is True
    (registry.root / "v2" / "config.json").write_text("{}")
    damaged = heed("registry", "show", "v2", "--data-dir", str(data_dir))
    assert damaged.returncode == 1 and "does not match" in json.loads(damaged.stdout)["verify_error"]
    missing = heed("registry", "show", "v9", "--data-dir", str(data_dir))
    assert missing.returncode == 2 and "no published policy version" in missing.stderr


# A publisher (the trainer) that stops for good after copying its first file: the test kills it there.
_PUBLISH_AND_HANG = """
import shutil, sys, time
from pathlib import Path
import heed.registry as registry

copy = shutil.copyfile
def copy_then_hang(src, dst, **kwargs):
    copied = copy(src, dst, **kwargs)
    print("copied", flush=True)
    time.sleep(120)
    return copied
registry.shutil.copyfile = copy_then_hang
registry.PolicyRegistry(Path(sys.argv[1])).publish(Path(sys.argv[2]), parent="base", source="trainer")
"""


def test_a_publisher_killed_mid_copy_leaves_no_version_and_its_leftovers_are_cleared(
    tmp_path: Path, policy: Path
) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(policy, "base")
    publisher = subprocess.Popen(
        [sys.executable, "-c", _PUBLISH_AND_HANG, str(registry.root), str(policy)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert publisher.stdout is not None and publisher.stdout.readline().strip() == "copied"
        leftovers = [p for p in registry.root.iterdir() if p.name.startswith(".publishing-")]
        assert [p.name.split("-")[1:3] for p in leftovers] == [[str(publisher.pid), "v2"]]
        registry.remove_stale()  # the writer is alive: its folder stays
        assert all(p.exists() for p in leftovers)
    finally:
        publisher.kill()  # SIGKILL: no exception handler runs, the half-copied folder stays behind
        publisher.wait(timeout=30)

    assert [m.version for m in registry.versions()] == ["base"]
    with pytest.raises(UnknownVersion):
        registry.verify("v2")
    registry.remove_stale()  # what the trainer does when it starts
    assert [p.name for p in registry.root.iterdir() if p.name.startswith(".")] == []
    again = registry.publish(policy, parent="base", source="trainer")
    assert again.version == "v2" and registry.verify("v2") == registry.root / "v2"


def lora_adapter(folder: Path, **config: object) -> Path:
    """A peft-shaped LoRA adapter folder (the files the registry reads; the weights are bytes)."""
    folder.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none", "target_modules": ["v_proj", "q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **config}))
    (folder / "adapter_model.safetensors").write_bytes(b"lora weights")
    (folder / "README.md").write_text("peft's model card")
    return folder


def test_an_adapter_is_published_on_a_full_base_and_verified_against_it(tmp_path: Path, policy: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    base = registry.import_base(policy, "base")
    v2 = registry.publish(lora_adapter(tmp_path / "a"), mode="adapter", base="base", parent="base", source="trainer")

    assert (v2.mode, v2.base, v2.base_files) == ("adapter", "base", base.files)
    assert v2.adapter == {"format": "peft", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    assert set(v2.files) == {"adapter_config.json", "adapter_model.safetensors"}  # peft's README dropped
    assert registry.verify("v2") == registry.root / "v2"
    assert registry.manifest("v2") == v2 and base.mode == "full" and base.base is None

    # A full version's manifest is written as before modes existed, and loads as a full version.
    old = json.loads((registry.root / "base" / "manifest.json").read_text())
    assert "mode" not in old and registry.manifest("base").mode == "full"

    # The base's recorded files changed (hand-edited manifest): the adapter no longer fits it.
    old["files"]["model.safetensors"] = "0" * 64
    (registry.root / "base" / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(CorruptVersion, match="has changed since the adapter was published"):
        registry.verify("v2")


@pytest.mark.parametrize(
    ("config", "base", "error"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, "base", "target_modules"),
        ({"modules_to_save": ["embed_tokens"]}, "base", "modules_to_save"),
        ({"bias": "lora_only"}, "base", "bias"),
        ({"use_dora": True}, "base", "DoRA"),
        ({"peft_type": "IA3"}, "base", "only LoRA"),
        ({}, None, "needs the full version it sits on"),
        ({}, "v2", "adapter itself"),
        ({}, "v9", "no published policy version"),
    ],
)
def test_an_adapter_heed_cannot_serve_is_refused_at_publication(
    tmp_path: Path, policy: Path, config: dict, base: str | None, error: str
) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(policy, "base")
    registry.publish(lora_adapter(tmp_path / "good"), mode="adapter", base="base")  # v2, an adapter
    with pytest.raises(RegistryError, match=error):
        registry.publish(lora_adapter(tmp_path / "bad", **config), mode="adapter", base=base)
    with pytest.raises(RegistryError, match="not a peft adapter folder"):
        registry.publish(policy, mode="adapter", base="base")
    with pytest.raises(RegistryError, match="a full version has no base"):
        registry.publish(policy, base="base")
    assert [m.version for m in registry.versions()] == ["base", "v2"]


def test_full_manifests_and_rollout_states_stay_readable_by_older_heeds_and_newer_fields_are_ignored(
    tmp_path: Path, policy: Path
) -> None:
    """What a full-weight service writes has no adapter-mode key (a rolling update's older replica,
    or a downgrade, reads it with `cls(**data)`), and a key from a newer heed is ignored on read."""
    from heed.rollout import RolloutState

    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(policy, "base")
    v2 = registry.publish(lora_adapter(tmp_path / "a"), mode="adapter", base="base")
    written = json.loads((registry.root / "base" / "manifest.json").read_text())
    assert not {"mode", "base", "base_files", "adapter"} & set(written)
    assert json.loads((registry.root / "v2" / "manifest.json").read_text())["mode"] == "adapter"
    (registry.root / "base" / "manifest.json").write_text(json.dumps({**written, "from_the_future": 1}))
    assert registry.manifest("base").mode == "full" and registry.verify("v2")
    assert registry.manifest("v2") == v2

    assert "mode" not in RolloutState(stable="base").to_json()
    state = RolloutState(stable="v2", mode="adapter")
    assert RolloutState.from_json({**state.to_json(), "from_the_future": 1}) == state
    with pytest.raises(RegistryError, match="heed registry merge v2"):
        registry.verify_full("v2")


def _served(stable: str, *promoted: str, canary: str | None = None, considered: int = 0) -> RolloutState:
    """A rollout state that started on ``stable``, promoted ``promoted`` in turn, and has ``canary`` live."""
    history = [decision("initialised", stable, "server", "the served base model", 0.0)]
    history += [decision("promoted", v, "controller", "won", 0.0) for v in promoted]
    return RolloutState(
        stable=promoted[-1] if promoted else stable,
        canary=canary,
        considered_sequence=considered,
        history=tuple(history),
    )


def test_the_rollout_uses_stable_the_canary_and_the_stable_before_the_last_promotion() -> None:
    assert _served("base").in_use() == {"base"}
    assert _served("base", "v2", canary="v3").in_use() == {"v2", "v3", "base"}
    assert _served("base", "v2", "v4", "v5").in_use() == {"v5", "v4"}
    assert RolloutState().in_use() == set()


def _age(registry: PolicyRegistry, hours: float = 2) -> None:
    """Make every version look published, and last verified, ``hours`` ago."""
    then = time.time() - hours * 3600
    for m in registry.versions():
        os.utime(registry.root / m.version, (then, then))


def test_the_trainers_status_names_its_latest_versions_and_counts_the_pruned(
    tmp_path: Path, policy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trainer of months has published thousands of versions: its status says how many, how many
    were pruned, and names the latest, each marked when pruned."""
    from training.cli import _published
    from training.config import TrainerConfig

    registry = PolicyRegistry(tmp_path / "data" / "registry")
    registry.import_base(policy, "base")
    published = tuple(registry.publish(policy, parent="base", source="trainer").version for _ in range(12))  # v2..v13
    _age(registry)
    registry.prune(keep=2, protect=_served("base", "v11", "v12").in_use(), after_sequence=13)
    monkeypatch.delenv("HEED_REGISTRY", raising=False)  # the data directory's registry/
    cfg = TrainerConfig(data_dir=tmp_path / "data")

    assert _published(published[:3], cfg) == "v2 (pruned), v3 (pruned), v4 (pruned)"
    # v12 (stable) and v13 (the newest) stay, and v11 (the stable before the promotion of v12).
    latest = ", ".join([*(f"v{i} (pruned)" for i in range(4, 11)), "v11", "v12", "v13"])
    assert _published(published, cfg) == f"12, 9 of them pruned; the latest 10: {latest}"
    assert _published((), cfg) == "(none)"


def test_pruning_removes_only_the_trainers_old_versions_that_nothing_uses(tmp_path: Path, policy: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(policy, "base")  # sequence 1
    for _ in range(5):  # v2..v6, the trainer's full versions
        registry.publish(policy, parent="base", source="trainer")
    registry.publish(policy, version="mine", source="manual")  # 7
    registry.publish(lora_adapter(tmp_path / "a7"), mode="adapter", base="v3", source="trainer")  # v8 on v3
    registry.publish(policy, source="trainer")  # v9: published, not yet taken up (considered: 8)
    before = registry.size("v2")
    rollout = _served("base", "v4", "v5", canary="v8", considered=8)  # stable v5, previous v4, canary v8
    which = {"keep": 2, "protect": rollout.in_use(), "after_sequence": rollout.considered_sequence}
    assert registry.prunable(**which) == []  # all published within the last hour
    _age(registry)
    registry.verify("v6")  # a server loads it (say, an admin's canary): it stays for the hour
    assert [m.version for m in registry.prunable(**which)] == ["v2"]
    _age(registry)

    # The newest 2 of the trainer's (v8, v9), the rollout's (v5, v4, v8), v8's base v3, the import
    # and the manual version stay; v2 and v6 go.
    assert [m.version for m in registry.prunable(**which)] == ["v2", "v6"]
    removed = registry.prune(**which)
    assert [m.version for m in removed] == ["v2", "v6"]
    assert [m.version for m in registry.versions()] == ["base", "v3", "v4", "v5", "mine", "v8", "v9"]
    assert [m.version for m in registry.pruned()] == ["v2", "v6"] and before > 0
    assert not (registry.root / "v2").exists() and not any(
        p.name.startswith(".pruning-") for p in registry.root.iterdir()
    )
    with pytest.raises(UnknownVersion, match=r"'v2' was pruned .*\.pruned/v2\.json"):
        registry.verify("v2")
    assert registry.verify("v8") == registry.root / "v8"  # its base is whole
    assert registry.publish(policy, source="trainer").version == "v10"  # names are not reused
    with pytest.raises(RegistryError, match="v2 was published before and pruned"):
        registry.publish(policy, version="v2")
    _age(registry)
    # Keeping only the newest (v10), v9 stays while no server has taken it up, and goes once one has.
    assert registry.prune(**{**which, "keep": 1}) == []
    assert [m.version for m in registry.prune(**{**which, "keep": 1, "after_sequence": 10})] == ["v9"]

    with pytest.raises(RegistryError, match="keep must be at least 1"):
        registry.prunable(0)


def test_a_pruning_that_died_midway_is_cleared_at_the_next_start(tmp_path: Path, policy: Path) -> None:
    registry = PolicyRegistry(tmp_path / "registry")
    registry.import_base(policy, "base")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "registry" / f".pruning-{gone.stdout.strip()}-v2"  # a pruner's pid that no longer runs
    mine = tmp_path / "registry" / f".pruning-{os.getpid()}-v3"  # a live one's (this process)
    for folder in (dead, mine):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half deleted")
    registry.remove_stale()
    assert not dead.exists() and mine.exists()
    assert [m.version for m in registry.versions()] == ["base"]


def test_heed_registry_prune_keeps_what_the_rollout_uses(tmp_path: Path, policy: Path) -> None:
    data_dir = tmp_path / "data"
    registry = PolicyRegistry(data_dir / "registry")
    registry.import_base(policy, "base")
    for _ in range(4):  # v2..v5
        registry.publish(policy, parent="base", source="trainer")

    def heed(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "heed", "registry", "prune", "--data-dir", str(data_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    refused = heed("--keep", "1")  # no server has written a rollout state: nothing is known to be unused
    assert refused.returncode == 2 and "no rollout state" in refused.stderr
    assert [m.version for m in registry.versions()] == ["base", "v2", "v3", "v4", "v5"]
    save_state(data_dir, _served("base", "v3", considered=5))  # stable v3, previous base
    _age(registry)

    dry = heed("--keep", "1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[2] for line in dry.stdout.splitlines()[:-1]] == ["v2", "v4"]
    assert dry.stdout.splitlines()[-1].endswith("keeping: base, v3, v5")
    assert len(registry.versions()) == 5
    done = heed("--keep", "1")
    assert done.returncode == 0 and "removed 2 version(s)" in done.stdout
    assert [m.version for m in registry.versions()] == ["base", "v3", "v5"]
    assert heed("--keep", "0").returncode == 2


def test_the_trainer_prunes_its_old_versions_when_the_rollout_moves(
    tmp_path: Path, policy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from training.config import TrainerConfig
    from training.trainer import run_trainer

    data_dir = tmp_path / "data"
    registry = PolicyRegistry(data_dir / "registry")
    registry.import_base(policy, "base")
    for _ in range(5):  # v2..v6
        registry.publish(policy, parent="base", source="trainer")
    # Stable v4 (before it v2), v6 the canary being judged: no round starts, but v3 and v5 can go.
    save_state(data_dir, _served("base", "v2", "v4", canary="v6", considered=6))
    _age(registry)
    caplog.set_level("INFO")

    assert run_trainer(TrainerConfig(data_dir=data_dir, once=True, keep_versions=0, threads=1, nice=0)) == 0
    assert [m.version for m in registry.versions()] == ["base", "v2", "v3", "v4", "v5", "v6"]  # 0: keeps all

    assert run_trainer(TrainerConfig(data_dir=data_dir, once=True, keep_versions=1, threads=1, nice=0)) == 0
    assert "canary v6 is being judged" in caplog.text
    assert [m.version for m in registry.versions()] == ["base", "v2", "v4", "v6"]
    assert "pruned v3, v5 from the registry" in caplog.text

    assert run_trainer(TrainerConfig(data_dir=data_dir, once=True, keep_versions=-1)) == 2

    # Its metrics say what the registry holds after pruning, and how much it pruned.
    from prometheus_client import generate_latest

    from heed.trainer_files import TrainerFiles
    from training.exporter import TrainerMetrics
    from training.trainer import _follow

    metrics = TrainerMetrics(TrainerFiles.of(data_dir))
    save_state(data_dir, _served("base", "v2", "v4", "v6", considered=6))  # v6 promoted: v2 is no longer in use
    cfg = TrainerConfig(data_dir=data_dir, once=True, keep_versions=1, threads=1, nice=0)
    assert _follow(cfg, threading.Event(), TrainerFiles.of(data_dir), registry, metrics) == 0
    scraped = generate_latest(metrics.registry).decode()
    assert "heed_trainer_registry_pruned_versions_total 1.0" in scraped
    assert "heed_trainer_registry_versions 3.0" in scraped  # base, v4, v6
    size = sum(registry.size(v) for v in ("base", "v4", "v6"))
    gauge = next(line for line in scraped.splitlines() if line.startswith("heed_trainer_registry_bytes "))
    assert float(gauge.split()[1]) == size > 0
