"""The `Component` interface of `cdpflow stack`: one local service the stack starts, checks and stops.

A component owns one folder under the stack's data folder (`.stack/NAME/`) for its data, its
configuration, its pidfile and its log, listens on 127.0.0.1 only, and keeps this contract:

- `up()` is idempotent: a component that is already running and healthy is left as it is; one
  that is not running is started and waited for until `healthy()` or its timeout, and a start
  that does not come up fails with `StackError` carrying the end of its log.
- `down()` is idempotent: a stopped component is left as it is.
- `healthy()` asks the service itself (a real request, not an open port) and checks that the
  process the pidfile names is still alive.
- `status()` says running, stopped or unhealthy, without changing anything.

Installing the program is never a component's job: `make stack` and `make test` install it first.
`ProcessComponent` is the common case, one daemon process with a pidfile; Redis and the Kafka
broker are, and so will be the BigQuery emulator.
"""
from __future__ import annotations

import abc
import dataclasses
import errno
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import ClassVar, Dict, Optional

from cdpflow.errors import BadInput

HOST = "127.0.0.1"

RUNNING, STOPPED, UNHEALTHY = "running", "stopped", "unhealthy"


class StackError(RuntimeError):
    """A component could not be started or stopped; the message says why."""


@dataclasses.dataclass(frozen=True)
class ComponentStatus:
    """What `cdpflow stack status` shows of one component."""

    name: str
    # RUNNING; STOPPED (never started, or taken down); UNHEALTHY: started, not taken down, and its
    # process is gone or does not answer.
    state: str
    address: str
    pid: Optional[int]
    folder: Path
    detail: str = ""


def project_root() -> Path:
    """The project root of a source checkout, or the folder the command runs in for an installed package."""
    checkout = Path(__file__).resolve().parents[2]
    # From a source checkout (the usual case) the project root, wherever the command runs from;
    # an installed package has no project root, so the folder the command runs in.
    return checkout if (checkout / "setup.py").exists() else Path.cwd()


def env_port(variable: str, default: int) -> int:
    """A port from an environment variable (the stack's overrides), or the default."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise BadInput(f"{variable}={value!r} is not a port number (1-65535)")
    return int(value)


def port_taken(port: int) -> bool:
    """Whether something on this machine already listens on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as the services set it: connections of an earlier run waiting out TIME_WAIT
        # do not count as the port being taken, only a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class Component(abc.ABC):
    """One local service of the stack, kept in `root/NAME/`."""

    name: ClassVar[str]
    # How long `up` waits for the health check by default; a JVM service needs more than Redis.
    start_timeout: ClassVar[float] = 30.0
    # The environment variable that moves each port (by the purpose `ports` names it with).
    port_variables: ClassVar[Dict[str, str]] = {}

    def __init__(self, root: Path):
        self.folder = Path(root).resolve() / self.name

    @property
    @abc.abstractmethod
    def ports(self) -> Dict[str, int]:
        """The ports it listens on, by what they are for."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where a client reaches it, e.g. `127.0.0.1:6379`."""

    @abc.abstractmethod
    def up(self, timeout: Optional[float] = None) -> bool:
        """Starts it unless it is running and healthy. Returns whether it was started."""

    @abc.abstractmethod
    def down(self, timeout: float = 10.0) -> bool:
        """Stops it if it runs. Returns whether there was something to stop."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """Whether its process is alive and the service answers."""

    @abc.abstractmethod
    def status(self) -> ComponentStatus:
        """Its state, address, pid and folder, without changing anything."""


class ProcessComponent(Component):
    """A component that is one daemon process whose pid is in `FOLDER/NAME.pid`.

    Subclasses say which program it is, how to start it (`_launch`) and how to ask it whether it
    is well (`_answers`).
    """

    # The executable, looked up on PATH; its name also identifies the process in /proc.
    program: ClassVar[str]

    @property
    def pidfile(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.folder / f"{self.name}.log"

    def executable(self) -> Optional[str]:
        """The program's path (default: looked up on PATH), or None when it is not installed."""
        return shutil.which(self.program)

    @abc.abstractmethod
    def _launch(self, executable: str) -> None:
        """Starts the daemon, which writes `pidfile` itself; returns once it has been handed off."""

    @abc.abstractmethod
    def _answers(self) -> bool:
        """A real request to the service (not just an open port): does it answer as it should?"""

    def pid(self) -> Optional[int]:
        """The pid of its live process, or None."""
        recorded = self._recorded_pid()
        return recorded if recorded is not None and self._alive(recorded) else None

    def healthy(self) -> bool:
        return self.pid() is not None and self._answers()

    def status(self) -> ComponentStatus:
        recorded = self._recorded_pid()
        if recorded is None:
            return ComponentStatus(self.name, STOPPED, self.address, None, self.folder)
        if not self._alive(recorded):
            return ComponentStatus(self.name, UNHEALTHY, self.address, recorded, self.folder,
                                   "its process is gone without `stack down` (see its log)")
        if not self._answers():
            return ComponentStatus(self.name, UNHEALTHY, self.address, recorded, self.folder,
                                   "its process is alive but does not answer")
        return ComponentStatus(self.name, RUNNING, self.address, recorded, self.folder)

    def up(self, timeout: Optional[float] = None) -> bool:
        timeout = self.start_timeout if timeout is None else timeout
        if self.pid() is not None:
            # Running already (perhaps still starting): never a second process over the same data.
            self._wait_healthy(timeout, "is running but does not answer its health check")
            return False
        executable = self.executable()
        if executable is None:
            raise StackError(f"{self.program} is not installed: run `make stack` (or `make test`), which installs it")
        for purpose, port in self.ports.items():
            if port_taken(port):
                variable = self.port_variables.get(purpose, "its port variable")
                raise StackError(f"{self.name}: {HOST}:{port} ({purpose}) is taken by another process: stop that, "
                                 f"or set {variable} to another port")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pidfile.unlink(missing_ok=True)  # left by a process that died: it would name a stranger
        self._launch(executable)
        try:
            self._wait_healthy(timeout, "did not come up")
        except StackError:
            self.down()
            raise
        return True

    def down(self, timeout: float = 10.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        try:
            os.kill(pid, signal.SIGTERM)
            # A process stopped with SIGSTOP would hold the SIGTERM until it is continued.
            os.kill(pid, signal.SIGCONT)
            if not self._wait_gone(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                self._wait_gone(pid, 5.0)
        except ProcessLookupError:
            pass  # it ended by itself meanwhile
        # The daemon removes its pidfile on a clean shutdown; after SIGKILL it is left behind.
        self.pidfile.unlink(missing_ok=True)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log written)"

    def _wait_healthy(self, timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            recorded = self._recorded_pid()
            # Whether it still exists, not whether it is ours by its command line: the process was
            # started just now, and between its fork and its exec it still shows this Python's.
            if recorded is not None and not self._exists(recorded):
                # It wrote its pidfile and then died (it refused its data, say): no use waiting on.
                failure = "exited while starting"
                break
            if time.monotonic() >= deadline:
                failure = f"{failure} within {timeout:g} s"
                break
            time.sleep(0.05)
        else:
            return
        raise StackError(f"{self.name} {failure} on {self.address}; the end of {self.logfile}:\n{self.log_tail()}")

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not ProcessComponent._exists(pid):
                return True
            time.sleep(0.05)
        return not ProcessComponent._exists(pid)

    def _recorded_pid(self) -> Optional[int]:
        try:
            text = self.pidfile.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() else None

    def _alive(self, pid: int) -> bool:
        # A pidfile outlives a crash or a reboot, and its number may since belong to another
        # process: only a live process of this program counts, so `down` never signals a stranger.
        if not self._exists(pid):
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return not Path("/proc/self").exists()  # no /proc to ask: trust the pidfile
        except OSError:
            return False
        return self._is_ours(cmdline)

    def _is_ours(self, cmdline: bytes) -> bool:
        """Whether a live process with this command line (NUL-separated arguments) is this component's."""
        return self.program.encode() in cmdline

    @staticmethod
    def _exists(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False  # another user's process, so not one the stack started
        # A daemon whose parent does not reap it lingers as a zombie: it exists but is gone.
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def free_port() -> int:
    """A port nothing on 127.0.0.1 uses now (for a component started on a free port: tests, benchmarks), below the kernel's range for outgoing connections.

    The kernel's own choice (bind to port 0) comes from that range, where any client connection
    (a Kafka broker opens many) may take it between this call and the service's start; the stack
    then refuses it as taken.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as limits:
            ephemeral_low = int(limits.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    while True:
        port = random.randrange(10000, max(ephemeral_low, 10001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
