"""Flink as a `cdpflow stack` component: a standalone session cluster on 127.0.0.1.

A JobManager and two TaskManagers with one slot each (so that a job at parallelism 2 runs in
two processes, and killing one TaskManager means something), each a JVM started in the
foreground by Flink's own scripts under a pidfile of ours, like the other components:

    .stack/flink/conf/config.yaml      written on every start (ports, memory, checkpoint folders)
    .stack/flink/home/                 FLINK_HOME: links to the apache-flink wheel's bin/ and the
                                       apache-flink-libraries' lib/, opt/, plugins/ (one link a file)
    .stack/flink/checkpoints/, savepoints/, log/
    .stack/flink/jobmanager.pid, taskmanager-1.pid, taskmanager-2.pid (and .log each)

The distribution is the job's venv (`make flink`: `.cache/flink-venv`, PyPI's apache-flink 2.2.1
and apache-flink-libraries), so the cluster and the job's Python agree on the version. Memory
fits beside Kafka and Redis on a 2-core, 24 GiB machine: JobManager 1 GiB, TaskManagers 2 GiB
each. The web dashboard and REST API answer on 8081 (`CDPFLOW_STACK_FLINK_PORT`); health is a
real REST request (`/overview`) that must list both TaskManagers.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

from cdpflow.stack.base import (HOST, RUNNING, STOPPED, UNHEALTHY, Component, ComponentStatus, StackError,
                                env_port, port_taken, project_root)

FLINK_VERSION = "2.2.1"
TASKMANAGERS = 2
# How a cluster process is recognised in /proc: its start scripts until they exec the JVM, then
# the JVM's main class.
_JOBMANAGER = (b"jobmanager.sh", b"flink-console.sh", b"StandaloneSessionClusterEntrypoint")
_TASKMANAGER = (b"taskmanager.sh", b"flink-console.sh", b"TaskManagerRunner")


def flink_venv() -> Path:
    """The Flink job's venv (`make flink`), or `CDPFLOW_FLINK_VENV`."""
    configured = os.environ.get("CDPFLOW_FLINK_VENV")
    return Path(configured).resolve() if configured else project_root() / ".cache" / "flink-venv"


def distribution() -> Path:
    """The Flink distribution inside the job's venv: PyFlink's package folder is a FLINK_HOME."""
    found = sorted(flink_venv().glob("lib/python3*/site-packages/pyflink"))
    if not found or not (found[0] / "lib" / f"flink-dist-{FLINK_VERSION}.jar").exists():
        raise StackError(f"no Flink {FLINK_VERSION} distribution in {flink_venv()}: run `make flink` "
                         "(or `make stack`), which builds it")
    return found[0]


def connector_jars() -> List[Path]:
    """The Kafka connector jar(s) the job hands to the cluster (`make flink` fetches them)."""
    folder = Path(os.environ.get("CDPFLOW_FLINK_JARS") or project_root() / ".cache" / "flink" / "jars")
    jars = sorted(folder.glob("*.jar"))
    if not jars:
        raise StackError(f"no Kafka connector jar in {folder}: run `make flink`, which fetches it")
    return jars


class _Process:
    """One JVM of the cluster under a pidfile: started in the foreground, its output to a log."""

    def __init__(self, folder: Path, name: str, markers):
        self.folder, self.name, self.markers = folder, name, markers

    @property
    def pidfile(self) -> Path:
        return self.folder / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.folder / f"{self.name}.log"

    def pid(self) -> Optional[int]:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return None
        if state == "Z":
            return None
        # A pid the kernel gave to another process since counts as gone. An empty command line
        # is a process in the middle of an exec (script -> script -> JVM): still ours.
        return pid if not cmdline or any(m in cmdline for m in self.markers) else None

    def start(self, script: Path, arguments: List[str], env: Dict[str, str]) -> int:
        with open(self.logfile, "ab") as log:
            # start-foreground execs the JVM, so the pid is the JVM's; a session of its own keeps
            # a terminal's Ctrl-C from reaching it (`stack down` stops it).
            process = subprocess.Popen([str(script), "start-foreground", *arguments], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.pidfile.write_text(str(process.pid))
        return process.pid

    def stop(self, timeout: float = 20.0, kill: bool = False) -> bool:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        try:
            os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.pid() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.pid() is not None:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while self.pid() is not None and time.monotonic() < deadline:
                    time.sleep(0.1)
        except ProcessLookupError:
            pass
        # Started in a session of its own, the JVM leads a process group with the Python workers
        # it forked: they go with it (a killed TaskManager's workers would live on as orphans).
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.pidfile.unlink(missing_ok=True)
        return True


class Flink(Component):
    """The Flink session cluster of the stack (see the module docstring).

    Args:
      root: the stack's data folder.
      port: the REST port (the dashboard), default 8081.
      rpc_port: the JobManager's RPC port, default 6123.
    """

    name = "flink"
    start_timeout = 90.0
    port_variables = {"rest": "CDPFLOW_STACK_FLINK_PORT", "rpc": "CDPFLOW_STACK_FLINK_RPC_PORT"}

    def __init__(self, root: Path, port: Optional[int] = None, rpc_port: Optional[int] = None):
        super().__init__(root)
        self.port = port or env_port("CDPFLOW_STACK_FLINK_PORT", 8081)
        self.rpc_port = rpc_port or env_port("CDPFLOW_STACK_FLINK_RPC_PORT", 6123)
        self.jobmanager = _Process(self.folder, "jobmanager", _JOBMANAGER)
        self.taskmanagers = [_Process(self.folder, f"taskmanager-{i}", _TASKMANAGER)
                             for i in range(1, TASKMANAGERS + 1)]

    @property
    def ports(self) -> Dict[str, int]:
        return {"rest": self.port, "rpc": self.rpc_port}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def home(self) -> Path:
        return self.folder / "home"

    def config(self) -> str:
        """The cluster's `config.yaml` (Flink 2's flat-key YAML)."""
        settings = {
            # everything on the loopback interface
            "jobmanager.rpc.address": HOST, "jobmanager.rpc.port": self.rpc_port, "jobmanager.bind-host": HOST,
            "taskmanager.host": HOST, "taskmanager.bind-host": HOST,
            "rest.address": HOST, "rest.bind-address": HOST, "rest.port": self.port,
            "blob.server.port": "0", "taskmanager.rpc.port": "0", "taskmanager.data.port": "0",
            # fits beside Kafka and Redis on 2 cores and 24 GiB
            "jobmanager.memory.process.size": "1024m", "taskmanager.memory.process.size": "2048m",
            "taskmanager.numberOfTaskSlots": 1, "parallelism.default": TASKMANAGERS,
            # a failed task restarts its region from the last checkpoint, a few times; the attempts
            # span more than the heartbeat timeout, so a killed TaskManager is declared lost (and
            # its replacement's slot used) before they run out
            "jobmanager.execution.failover-strategy": "region",
            "restart-strategy.type": "fixed-delay", "restart-strategy.fixed-delay.attempts": 10,
            "restart-strategy.fixed-delay.delay": "5 s",
            "execution.checkpointing.dir": (self.folder / "checkpoints").as_uri(),
            "execution.checkpointing.savepoint-dir": (self.folder / "savepoints").as_uri(),
            # a TaskManager killed is noticed in seconds, not the default 50 s
            "heartbeat.timeout": 15000, "heartbeat.interval": 3000,
        }
        return "".join(f"{key}: {value}\n" for key, value in settings.items())

    def _prepare(self) -> Dict[str, str]:
        """Lays out FLINK_HOME and the configuration; returns the environment the scripts run in."""
        dist = distribution()
        if self.home.exists():
            shutil.rmtree(self.home)
        for part in ("bin", "lib", "opt", "plugins"):
            (self.home / part).mkdir(parents=True)
            source = dist / part
            if source.exists():
                for item in source.iterdir():
                    (self.home / part / item.name).symlink_to(item)
        # PyFlink jobs need flink-python on the cluster's classpath (it ships in opt/)
        for jar in (dist / "opt").glob("flink-python-*.jar"):
            (self.home / "lib" / jar.name).symlink_to(jar)
        conf = self.folder / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        for name in ("log4j-console.properties", "log4j.properties", "log4j-cli.properties"):
            shutil.copy(dist / "conf" / name, conf / name)
        (conf / "config.yaml").write_text(self.config())
        for folder in ("checkpoints", "savepoints", "log"):
            (self.folder / folder).mkdir(exist_ok=True)
        return self._env()

    # ------------------------------------------------------------------------------ lifecycle
    def up(self, timeout: Optional[float] = None) -> bool:
        timeout = self.start_timeout if timeout is None else timeout
        if self.jobmanager.pid() is not None and all(tm.pid() for tm in self.taskmanagers):
            self._wait_healthy(timeout)
            return False
        self.down()  # a partial cluster left by a crash: start clean
        for purpose, port in self.ports.items():
            if port_taken(port):
                raise StackError(f"flink: {HOST}:{port} ({purpose}) is taken by another process: stop that, or set "
                                 f"{self.port_variables[purpose]} to another port")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = self._prepare()
        self.jobmanager.start(self.home / "bin" / "jobmanager.sh", [], env)
        for tm in self.taskmanagers:
            tm.start(self.home / "bin" / "taskmanager.sh", [], env)
        try:
            self._wait_healthy(timeout)
        except StackError:
            self.down()
            raise
        return True

    def start_taskmanager(self, index: int) -> int:
        """Starts TaskManager `index` (1-based) again, e.g. after a kill test; returns its pid."""
        return self.taskmanagers[index - 1].start(self.home / "bin" / "taskmanager.sh", [], self._env())

    def kill_taskmanager(self, index: int) -> int:
        """SIGKILLs TaskManager `index` (1-based), as a crash would; returns the pid killed."""
        tm = self.taskmanagers[index - 1]
        pid = tm.pid()
        if pid is None:
            raise StackError(f"taskmanager-{index} is not running")
        tm.stop(kill=True)
        return pid

    def _env(self) -> Dict[str, str]:
        """The environment Flink's scripts run in: this cluster's home, configuration and folders."""
        env = dict(os.environ, FLINK_HOME=str(self.home), FLINK_CONF_DIR=str(self.folder / "conf"),
                   FLINK_LOG_DIR=str(self.folder / "log"), FLINK_PID_DIR=str(self.folder))
        env.pop("PYTHONPATH", None)
        return env

    def down(self, timeout: float = 20.0) -> bool:
        # TaskManagers first: the JobManager would otherwise restart their tasks elsewhere
        stopped = [tm.stop(timeout) for tm in self.taskmanagers]
        return self.jobmanager.stop(timeout) or any(stopped)

    def rest(self, path: str, method: str = "GET", body: Optional[Dict[str, Any]] = None, timeout: float = 5.0) -> Any:
        """One REST request to the JobManager; the decoded JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.rest_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            text = answer.read()
        return json.loads(text) if text else None

    def taskmanagers_registered(self) -> int:
        try:
            return int(self.rest("/overview", timeout=2.0).get("taskmanagers", 0))
        except (urllib.error.URLError, OSError, ValueError):
            return -1

    def healthy(self) -> bool:
        return (self.jobmanager.pid() is not None and all(tm.pid() for tm in self.taskmanagers)
                and self.taskmanagers_registered() == TASKMANAGERS)

    def status(self) -> ComponentStatus:
        pids = [self.jobmanager.pid()] + [tm.pid() for tm in self.taskmanagers]
        recorded = [p.pidfile.exists() for p in [self.jobmanager, *self.taskmanagers]]
        if not any(recorded):
            return ComponentStatus(self.name, STOPPED, self.address, None, self.folder)
        if not all(pids):
            gone = [p.name for p, pid in zip([self.jobmanager, *self.taskmanagers], pids) if pid is None]
            return ComponentStatus(self.name, UNHEALTHY, self.address, pids[0], self.folder,
                                   f"{', '.join(gone)} gone without `stack down` (see its log)")
        registered = self.taskmanagers_registered()
        if registered != TASKMANAGERS:
            return ComponentStatus(self.name, UNHEALTHY, self.address, pids[0], self.folder,
                                   f"the REST API answers {registered} TaskManagers registered, not {TASKMANAGERS}")
        return ComponentStatus(self.name, RUNNING, self.address, pids[0], self.folder)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            dead = [p for p in [self.jobmanager, *self.taskmanagers] if p.pid() is None]
            if dead:
                time.sleep(1.0)  # asked again: a start script between two execs can look gone
                dead = [p for p in dead if p.pid() is None]
            if dead:
                raise StackError(f"flink: {dead[0].name} exited while starting; the end of {dead[0].logfile}:\n"
                                 + _tail(dead[0].logfile))
            time.sleep(0.2)
        raise StackError(f"flink did not come up within {timeout:g} s on {self.address} (TaskManagers registered: "
                         f"{self.taskmanagers_registered()}); the end of {self.jobmanager.logfile}:\n"
                         + _tail(self.jobmanager.logfile))


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"
