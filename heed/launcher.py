"""Start `heed serve` (or any command) as its own process group, and stop the whole group whatever
happens to the process that started it. Tests, benchmarks and `heed simulate` start servers here.

    free_port()        a free local TCP port
    ProcessGroup       a command started as the leader of a new process group: wait_for(), stop()
    ServeSpec          what `heed serve` to start: data dir, log, model, keys, trainer, env, flags
    ServerProcess      a started `heed serve`: its URLs, data dir and keys; wait_ready()
    launch_server()    start one and wait for /ready (stopped again if it never gets there)
    stop_all()         stop every group still running (registered with atexit)
    exit_on_sigterm()  make SIGTERM unwind like Ctrl-C, so `with` blocks and atexit run

Why a group: `heed serve` starts vLLM engine processes and, with --with-trainer, the trainer; a
signal to the server alone can leave them running. So the command leads a new session, and every
stop ends with SIGKILL to the whole group. A group is stopped
- on leaving its ``with`` block, or ``stop()``: SIGTERM to the leader (it stops its own children
  in order), a bounded wait, then SIGKILL to the group;
- at interpreter exit (atexit), e.g. after Ctrl-C or a SIGTERM made SystemExit, if still running;
- when the launching process dies without cleaning up (SIGKILL, os._exit, pytest-timeout's
  thread method): the kernel sends the leader SIGTERM (PR_SET_PDEATHSIG, Linux), and a watchdog
  process, which reads a pipe only the launcher holds open, sees it close and stops the group.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType

import httpx

from heed.datadir import DataDir

log = logging.getLogger(__name__)

_live: set[ProcessGroup] = set()  # started and not stopped yet: what stop_all() stops
_live_lock = threading.Lock()


class LaunchError(RuntimeError):
    """A launched command exited, or was not ready in time (the message ends with its log's tail)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessGroup:
    """``command`` started as the leader of a new process group, its output in ``log_path``; a
    context manager that stops the group on exit."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        stop_timeout_s: float = 60.0,
        append_log: bool = False,
    ) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab" if append_log else "wb") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # pgid = pid: one killpg reaches engines and trainer too
                preexec_fn=_dies_with(os.getpid()),
            )
        self.pid = self.process.pid
        self._stopped = False
        try:
            self._lifeline, self._watchdog = _start_watchdog(self.pid, stop_timeout_s, log_path)
        except BaseException:
            _kill_group(self.pid)
            self.process.wait(timeout=30)
            raise
        with _live_lock:
            _live.add(self)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, url: str, timeout_s: float, poll_s: float = 0.5) -> float:
        """Poll ``url`` until it answers 200; the seconds that took. LaunchError (with the log's
        tail) as soon as the command exits, or when ``timeout_s`` has passed."""
        return self.wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, "ready", timeout_s, poll_s)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float, poll_s: float) -> float:
        """Call ``ready`` every ``poll_s`` until it is true (an HTTP error counts as not yet); the
        seconds that took. LaunchError (with the log's tail) as soon as the command exits, or
        when ``timeout_s`` has passed."""
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise LaunchError(f"{self._name()} exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if ready():
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise LaunchError(f"{self._name()} was not {what} in {timeout_s:.0f}s:\n{self.log_text()[-4000:]}")
            time.sleep(poll_s)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` to the leader (SIGKILL: to the whole group at once, as a crash would), wait
        for it at most ``stop_timeout_s``, then SIGKILL whatever is left of the group. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.process.poll() is None:
                if sig == signal.SIGKILL:
                    _kill_group(self.pid)
                else:
                    self.process.send_signal(sig)
                try:
                    self.process.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs: killing its group", self._name(), self.stop_timeout_s)
            _kill_group(self.pid)  # engine processes and the trainer must not outlive their server
            self.process.wait(timeout=30)
        finally:
            with _live_lock:
                _live.discard(self)
            _release_watchdog(self._lifeline, self._watchdog, stopped=self.process.returncode is not None)

    def _name(self) -> str:
        return " ".join(self.command[1:4]) if self.command[0] == sys.executable else self.command[0]


@dataclass(frozen=True)
class ServeSpec:
    """What `heed serve` to start. Ports 0 are chosen free at start; keys become HEED_API_KEYS
    and HEED_ADMIN_KEYS (none: open, whatever the environment says); ``env`` goes on top of this
    process's environment; ``args`` are further `heed serve` flags (later flags win)."""

    data_dir: Path
    log_path: Path
    model: str = ""  # "": the bundled SmolLM2-135M-Instruct
    keys: Mapping[str, str] = field(default_factory=dict)  # principal -> API key
    admin_keys: Mapping[str, str] = field(default_factory=dict)  # name -> admin key
    with_trainer: bool = False
    enforce_eager: bool = False
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # e.g. HEED_TRAINER_* settings
    http_port: int = 0
    grpc_port: int = 0
    append_log: bool = False
    ready_timeout_s: float = 900.0  # a compiled engine on 2 cores takes minutes
    stop_timeout_s: float = 60.0

    def command(self) -> list[str]:
        if not (self.http_port and self.grpc_port):
            raise ValueError("ServeSpec.command() needs both ports (ServerProcess chooses free ones)")
        command = [sys.executable, "-m", "heed", "serve", "--data-dir", str(self.data_dir)]
        command += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        command += ["--model", self.model] if self.model else []
        command += ["--with-trainer"] if self.with_trainer else []
        command += ["--enforce-eager"] if self.enforce_eager else []
        return command + list(self.args)

    def environ(self) -> dict[str, str]:
        return {
            **os.environ,
            "HEED_API_KEYS": ",".join(f"{name}:{key}" for name, key in self.keys.items()),
            "HEED_ADMIN_KEYS": ",".join(f"{name}:{key}" for name, key in self.admin_keys.items()),
            **self.env,
        }


class ServerProcess(ProcessGroup):
    """A started `heed serve`: where it listens, its data directory and the keys it takes."""

    def __init__(self, spec: ServeSpec) -> None:
        self.spec = replace(spec, http_port=spec.http_port or free_port(), grpc_port=spec.grpc_port or free_port())
        self.http_url = f"http://127.0.0.1:{self.spec.http_port}"
        self.grpc_target = f"127.0.0.1:{self.spec.grpc_port}"
        self.data_dir = spec.data_dir
        self.data = DataDir(spec.data_dir)
        self.keys = dict(spec.keys)
        self.admin_keys = dict(spec.admin_keys)
        super().__init__(
            self.spec.command(),
            spec.log_path,
            env=self.spec.environ(),
            stop_timeout_s=spec.stop_timeout_s,
            append_log=spec.append_log,
        )

    def __enter__(self) -> ServerProcess:
        return self

    def wait_ready(self, timeout_s: float | None = None) -> float:
        """Wait until /ready answers 200 (the engine is loaded); the seconds that took."""
        return self.wait_for(self.http_url + "/ready", self.spec.ready_timeout_s if timeout_s is None else timeout_s)

    def wait_for_warm_canary(self, timeout_s: float = 600.0, poll_s: float = 1.0) -> float:
        """Wait until the warm canary slot is up (``--canary-slot warm`` starts it once the server
        is idle; the admin API says): the seconds that took. LaunchError as ``wait_for``, and at
        once when the admin API is off or refuses the admin key."""

        def warm() -> bool:
            answer = httpx.get(self.http_url + "/admin/rollout", timeout=10, headers=self.admin_headers())
            if answer.status_code in (401, 403, 404):
                raise LaunchError(f"{self._name()} does not show its rollout: {answer.status_code} {answer.text[:300]}")
            return answer.status_code == 200 and bool(answer.json().get("slots", {}).get("canary", {}).get("ready"))

        return self.wait_until(warm, "warm (its canary slot)", timeout_s, poll_s)

    def headers(self, principal: str | None = None) -> dict[str, str]:
        """The Authorization header of ``principal``'s API key (the first key's by default; none if open)."""
        return _bearer(self.keys, principal)

    def admin_headers(self, name: str | None = None) -> dict[str, str]:
        """The Authorization header of admin key ``name`` (the first one by default; none if unset)."""
        return _bearer(self.admin_keys, name)


def launch_server(spec: ServeSpec) -> ServerProcess:
    """Start `heed serve` and wait for /ready; a ready server (a context manager that stops it),
    or LaunchError with the log's tail, after stopping whatever had started."""
    server = ServerProcess(spec)
    try:
        server.wait_ready()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


def stop_all() -> None:
    """Stop every group started here and not stopped yet."""
    with _live_lock:
        groups = list(_live)
    for group in groups:
        try:
            group.stop()
        except Exception:  # one that will not stop must not keep the others running
            log.exception("could not stop %s", group.command)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) in this (main) thread: `with` blocks unwind and atexit
    runs, so what this process launched is stopped too."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


atexit.register(stop_all)


def _bearer(keys: Mapping[str, str], name: str | None) -> dict[str, str]:
    if not keys:
        return {}
    return {"Authorization": f"Bearer {keys[name] if name is not None else next(iter(keys.values()))}"}


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# ---- when the launcher dies without stopping what it started ---------------------------------

_PR_SET_PDEATHSIG = 1
_STOPPED = b"stopped"


def _dies_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child receive SIGTERM when ``parent`` (the thread that forks
    it, in fact: launch from one that outlives the server) dies; None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, not in the child
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)

    return preexec


def _start_watchdog(pgid: int, grace_s: float, log_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    """A process, in a session of its own (Ctrl-C and killpg of ours do not reach it), that blocks
    reading a pipe whose write end only this process holds (not inherited: PEP 446), and stops
    group ``pgid`` when it closes with no word that the group is stopped: when this process dies."""
    read_end, write_end = os.pipe()
    try:
        with open(log_path, "ab") as out:
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "heed.launcher", str(pgid), str(grace_s)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=out,
                start_new_session=True,
            )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return write_end, watchdog


def _release_watchdog(lifeline: int, watchdog: subprocess.Popen[bytes], stopped: bool) -> None:
    """Tell the watchdog the group is stopped (if it is), close the pipe, and reap it."""
    try:
        if stopped:
            os.write(lifeline, _STOPPED)
    finally:
        os.close(lifeline)
    try:
        watchdog.wait(timeout=10)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait(timeout=10)


def _watch(pgid: int, grace_s: float) -> None:
    """The watchdog: wait for the pipe on stdin to close. Unless the launcher said the group is
    stopped, stop it: SIGTERM to its leader, at most ``grace_s`` for the group to go, then
    SIGKILL to the group."""
    if sys.stdin.buffer.read() == _STOPPED:
        return
    with contextlib.suppress(ProcessLookupError):  # the leader may be gone, members of its group not
        os.kill(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)
    _kill_group(pgid)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


if __name__ == "__main__":
    _watch(int(sys.argv[1]), float(sys.argv[2]))
