"""Process supervision for the real components the tests start.

Every process started here is recorded in a module-level registry so a fixture (or the atexit
hook) can stop all of them even when a test failed half-way through its set-up.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "HarnessError",
    "Proc",
    "free_port",
    "pid_alive",
    "running",
    "start",
    "stop_all",
    "tcp_open",
    "unix_socket_open",
    "wait_for",
]

_PR_SET_PDEATHSIG = 1


class HarnessError(RuntimeError):
    """A real component did not start, did not become ready, or a command failed."""


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Proc:
    """One supervised process; create it with :func:`start`."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        popen: subprocess.Popen[bytes],
        log_path: Path,
        stdout_path: Path | None,
        netns: str | None = None,
    ) -> None:
        self.name = name
        self.netns = netns
        self.argv = list(argv)
        self.popen = popen
        self.log_path = log_path
        self.stdout_path = stdout_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def check_alive(self) -> None:
        """Raise (with the end of the log) if the process has exited."""
        rc = self.popen.poll()
        if rc is not None:
            raise HarnessError(
                f"{self.name} exited with {rc}; log {self.log_path}:\n{self.log_tail()}"
            )

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL (to the whole process group) after `timeout`; always reaps."""
        try:
            if self.popen.poll() is None:
                self.signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                    self.popen.wait(10)
        finally:
            _forget(self)
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL at once (simulates a crash); reaps."""
        try:
            self._kill_group()
            self.popen.wait(10)
        finally:
            _forget(self)
        return self.popen.returncode

    def _kill_group(self) -> None:
        # start() puts each process in its own session, so pgid == pid. Only called while the
        # leader is unreaped, so the pgid cannot belong to anyone else yet.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def __repr__(self) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        return f"<Proc {self.name} pid={self.pid} {state}>"


_lock = threading.Lock()
_procs: list[Proc] = []


def _forget(proc: Proc) -> None:
    with _lock:
        if proc in _procs:
            _procs.remove(proc)


def running() -> list[Proc]:
    """Processes started by this module and not yet stopped."""
    with _lock:
        return list(_procs)


def stop_all(timeout: float = 5.0, *, netns: Iterable[str] | None = None) -> list[str]:
    """Stop every registered process (only those inside `netns` names if given), newest
    first; returns errors instead of raising so one bad process cannot leak the others."""
    wanted = None if netns is None else set(netns)
    errors: list[str] = []
    for proc in reversed(running()):
        if wanted is not None and proc.netns not in wanted:
            continue
        try:
            proc.stop(timeout)
        except Exception as exc:  # keep stopping the others
            errors.append(f"{proc.name}: {exc!r}")
    return errors


atexit.register(stop_all)


def _preexec(pdeathsig: bool) -> Callable[[], None] | None:
    if not pdeathsig or _SETPRIV:
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def set_pdeathsig() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return set_pdeathsig


_SETPRIV = shutil.which("setpriv")


def start(
    argv: Sequence[str],
    *,
    name: str,
    log_path: Path,
    stdout_path: Path | None = None,
    netns: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start `argv` with stderr (and stdout unless `stdout_path`) appended to `log_path`.

    With `netns`, the command runs under `ip netns exec`, which execs in place, so the pid is
    the component's own pid and signals reach it directly.
    """
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # Parent-death signal: if pytest is killed outright, its components die with it. It
    # fires when the starting *thread* exits, so only from the main thread. setpriv (which
    # execs in place) avoids running Python in the forked child, unsafe with threads around.
    pdeathsig = threading.current_thread() is threading.main_thread()
    if pdeathsig and _SETPRIV:
        full = [_SETPRIV, "--pdeathsig", "KILL", "--", *full]
    proc_env = dict(os.environ if env is None else env)
    with open(log_path, "ab") as log:
        out = open(stdout_path, "ab") if stdout_path else log
        try:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=log,
                env=proc_env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec(pdeathsig),
            )
        except OSError as exc:
            raise HarnessError(f"cannot start {name}: {exc}") from exc
        finally:
            if out is not log:
                out.close()
    proc = Proc(name, full, popen, log_path, stdout_path, netns)
    with _lock:
        _procs.append(proc)
    return proc


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    proc: Proc | None = None,
    interval: float = 0.02,
) -> None:
    """Poll `predicate` until true; fail early (with its log) if `proc` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            proc.check_alive()
        if predicate():
            return
        if time.monotonic() >= deadline:
            log = f"\nlog {proc.log_path}:\n{proc.log_tail()}" if proc else ""
            raise HarnessError(f"timed out after {timeout}s waiting for {what}{log}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.25)


def unix_socket_open(path: Path) -> bool:
    """True when something accepts connections on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def tcp_open(host: str, port: int, netns: str | None = None) -> bool:
    """True when `host:port` accepts a TCP connection (seen from inside `netns` if given)."""

    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    if netns is None:
        return probe()
    from .netns import run_in_netns  # avoid an import cycle at module load

    return run_in_netns(netns, probe)


def free_port(host: str = "127.0.0.1", netns: str | None = None) -> int:
    """A TCP port that is free right now on `host` (racy by nature; bind soon after)."""

    def pick() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    if netns is None:
        return pick()
    from .netns import run_in_netns

    return run_in_netns(netns, pick)


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (an orphan's zombie may wait long for a
    reaper; it holds no sockets or ports any more)."""
    try:
        os.kill(pid, 0)
    except OSError as exc:
        if exc.errno != errno.EPERM:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
