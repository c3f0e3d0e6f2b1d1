"""Adapter mode: every policy version is a LoRA adapter of one base model, and one vLLM engine
with LoRA serves them all (docs/design/adapter-mode.md).

``AdapterEngine`` owns that engine and the adapters resident in it. ``AdapterSlot`` is a slot
("stable", "canary") as a view of it: it points at one version. Loading a version into a view
adds its adapter to the engine once (between two engine steps; nothing drains, no weights are
reloaded), then re-points the view. A request's lease pins the version together with its
adapter, so it is answered by the version it is logged under, whatever loads meanwhile.

The base itself is served as an adapter of zeros (``heed.models.identity_adapter``): vLLM 0.32's
CPU LoRA ops decode a request without an adapter, batched with adapter requests, with another
adapter's weights; with an identity adapter no request goes without one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from heed.registry import ADAPTER_TARGETS, MANIFEST, Manifest, adapter_fits
from serving.engine import EngineSettings, EngineSlot, Lease, SwapRefused
from serving.errors import NotFound
from serving.requests import GenerationRequest

log = logging.getLogger(__name__)

IDENTITY_RANK = 1  # the base's adapter of zeros: any rank is the identity, the smallest costs least


def read_manifest(folder: Path) -> Manifest:
    """The manifest the registry wrote into a version's folder."""
    try:
        return Manifest.from_json(json.loads((Path(folder) / MANIFEST).read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise SwapRefused(f"{folder} has no readable registry manifest: {exc}") from None


class AdapterEngine:
    """One engine on the base version's weights, serving versions as LoRA adapters of it.

    ``resident``: the versions whose adapter the engine holds, each with the one LoRARequest it
    is ever served under (its name the version, an id no other version gets, its immutable registry
    folder): vLLM's batches, adapter cache and prefix cache tell versions apart by these.
    An adapter leaves the engine once no view points at it, it is neither the previous stable
    nor the base, and no request holds it (``evict``)."""

    def __init__(self, slot: EngineSlot, adapters_dir: Path) -> None:
        """``slot``: the engine, on the base version's registry folder, with LoRA on (``settings.lora``)."""
        self.base = read_manifest(Path(slot.model))
        self.slot = slot
        self.adapters_dir = adapters_dir  # where the base's identity adapter is written
        self.views: dict[str, AdapterSlot] = {}
        self.resident: dict[str, Any] = {}  # version -> vllm LoRARequest
        self.refs: Counter[str] = Counter()  # version -> leases held on it
        self.previous: str | None = None  # the stable before the last promote
        self._next_id = 1
        self._ids: dict[str, int] = {}  # version -> its LoRA id, for the life of the engine
        self._lock = asyncio.Lock()
        self._evicting: set[asyncio.Task[None]] = set()

    @property
    def settings(self) -> EngineSettings:
        return self.slot.settings

    def start(self, background: bool = False) -> None:
        """Start the engine (blocking: call it from a thread of its own)."""
        if self.slot.engine is None:
            self.slot.start(background)

    def shutdown(self) -> None:
        self.slot.shutdown()

    def view(self, name: str, version: str = "") -> AdapterSlot:
        """The view called ``name`` (made on first use): it serves nothing until a version is loaded."""
        if name not in self.views:
            self.views[name] = AdapterSlot(name, self, version)
        return self.views[name]

    def pinned(self, version: str) -> AdapterSlot | None:
        """A view of ``version`` for one request that names it, when its adapter stays resident
        although no view points at it (the previous stable, the base); None when it does not.
        It is not one of ``views``: it keeps nothing resident, and its leases count in ``refs``."""
        lora = self.resident.get(version)
        if lora is None or version not in self.keep():
            return None
        view = AdapterSlot("pinned", self, version)
        view.lora = lora
        return view

    def in_flight(self) -> int:
        """Requests holding a lease on any view of this engine, pinned views included."""
        return sum(self.refs.values())

    def keep(self) -> set[str]:
        """The versions that stay resident: what a view points at, the previous stable, the base."""
        kept = {v.policy_version for v in self.views.values() if v.lora is not None}
        return kept | {self.base.version} | ({self.previous} if self.previous else set())

    def _identity(self) -> Path:
        from heed.models import identity_adapter

        dest = self.adapters_dir / f"{self.base.version}-identity-r{IDENTITY_RANK}"
        if not (dest / "adapter_config.json").is_file():
            identity_adapter(self.slot.model, dest, IDENTITY_RANK, ADAPTER_TARGETS)
        return dest

    async def ensure(self, version: str, folder: Path) -> Any:
        """The version's LoRARequest, its adapter added to the engine first if it is not resident.
        SwapRefused when the version is not an adapter of this base (or the base itself); vLLM's
        refusal of the adapter's files is raised as it comes, and the engine serves on."""
        async with self._lock:
            if version in self.resident:
                return self.resident[version]
            manifest = await asyncio.to_thread(read_manifest, folder)
            if manifest.version != version:
                raise SwapRefused(f"{folder} holds {manifest.version}, not {version}")
            if manifest.mode == "full":
                if manifest.version != self.base.version or manifest.files != self.base.files:
                    raise SwapRefused(
                        f"{version} is a full version, and this engine serves adapters of {self.base.version}: "
                        f"train it as an adapter, or serve it with --policy-mode full"
                    )
                path = await asyncio.to_thread(self._identity)
            else:
                why = adapter_fits(manifest, self.base)
                rank = int(manifest.adapter.get("r", 0))
                if why is None and rank > self.settings.max_lora_rank:
                    why = f"{version}'s rank {rank} is above --max-lora-rank {self.settings.max_lora_rank}"
                if why is not None:
                    raise SwapRefused(why)
                path = Path(folder)
            from vllm.lora.request import LoRARequest

            # A version added again (after it left the engine) keeps its id: vLLM tells adapters
            # apart by name in a batch, and one name must never come with two ids.
            if version not in self._ids:
                self._ids[version] = self._next_id
                self._next_id += 1
            request = LoRARequest(version, self._ids[version], str(path))
            started = time.monotonic()
            if not await self.slot.engine.add_lora(request):
                raise SwapRefused(f"the engine did not take {version}'s adapter")
            self.resident[version] = request
            log.info("adapter %s is resident (id %d, %.2f s)", version, request.lora_int_id, time.monotonic() - started)
            return request

    def repointed(self, view: str, old: str, new: str) -> None:
        """A view moved from ``old`` to ``new``: a stable's old version stays as the previous."""
        if view == "stable" and old and old != new:
            self.previous = old

    async def evict(self) -> None:
        """Take out of the engine the adapters nothing keeps and no request holds."""
        async with self._lock:
            keep = self.keep()
            for version, request in list(self.resident.items()):
                if version in keep or self.refs[version]:
                    continue
                del self.resident[version]
                try:
                    await self.slot.engine.remove_lora(request.lora_int_id)
                    log.info("adapter %s left the engine", version)
                except Exception as exc:  # the engine's own LRU drops it in time anyway
                    log.warning("removing adapter %s from the engine failed: %s", version, exc)

    def released(self, version: str) -> None:
        """A lease on ``version`` ended: evict it once nothing holds it, if nothing keeps it."""
        self.refs[version] -= 1
        if self.refs[version] <= 0:
            del self.refs[version]
            if version in self.resident and version not in self.keep():
                task = asyncio.get_running_loop().create_task(self.evict())
                self._evicting.add(task)
                task.add_done_callback(self._evicting.discard)


class AdapterSlot(EngineSlot):
    """A slot that is a view of the shared ``AdapterEngine``: it points at one resident version.
    Its loads never close it to requests, so it is never ``swapping``."""

    def __init__(self, name: str, shared: AdapterEngine, policy_version: str = "") -> None:
        super().__init__(name, shared.slot.model, policy_version, shared.settings)
        self.shared = shared
        self.lora: Any = None  # the LoRARequest of the version it points at; None: not loaded yet
        self.engine, self.tokenizer = shared.slot.engine, shared.slot.tokenizer

    @property
    def ready(self) -> bool:
        return self.lora is not None and super().ready

    def sampling(self, r: GenerationRequest, max_tokens: int, skip_special_tokens: bool = True) -> Any:
        return self.shared.slot.sampling(r, max_tokens, skip_special_tokens)

    def start(self, background: bool = False) -> None:
        self.shared.start(background)
        self.engine, self.tokenizer = self.shared.slot.engine, self.shared.slot.tokenizer

    def shutdown(self) -> None:
        self.shared.shutdown()
        self.engine = None

    async def lease(self) -> Lease:
        lease = await super().lease()
        # With no await from here on: the version, its adapter and the hold on it are one step.
        if self.shared.resident.get(lease.policy_version) is not self.lora:  # left while routed (a pinned view)
            super()._release(lease)
            raise NotFound(
                f"The model '{lease.policy_version}' has left the engine; retry with the served model name",
                param="model",
                code="model_not_found",
            )
        lease.lora = self.lora
        self.shared.refs[lease.policy_version] += 1
        return lease

    def _release(self, lease: Lease) -> None:
        self.shared.released(lease.policy_version)  # first: the engine is quiet once no view holds a lease
        super()._release(lease)

    def _quiet(self) -> None:
        """The engine's figures are the shared engine's, labelled by it (slot "engine")."""
        if not self.shared.in_flight():
            self.shared.slot._quiet()

    async def swap(self, policy_version: str, folder: Path) -> float:
        """Point this view at ``policy_version``, its adapter added first if it is not resident.
        Returns the seconds that took; on a failure the view serves what it served before."""
        started = time.monotonic()
        lora = await self.shared.ensure(policy_version, folder)
        old = self.policy_version if self.lora is not None else ""
        self.policy_version, self.lora = policy_version, lora
        self.model = folder
        self.swaps += 1
        self.shared.repointed(self.name, old, policy_version)
        await self.shared.evict()
        return time.monotonic() - started
