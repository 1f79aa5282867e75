"""Redis in the local stack: Debian's `redis-server`, on 127.0.0.1 with the append-only file on.

`cdpflow stack up redis` writes `.stack/redis/redis.conf` and starts `redis-server` with it as a
daemon (its own process, not the system service the Debian package installs); its data (the
append-only file), pidfile and log stay in `.stack/redis/`. The port is 6379 unless
`CDPFLOW_STACK_REDIS_PORT` says otherwise. Clients connect to `Redis(...).url()`.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Dict, Optional

import redis as redis_client
from redis.backoff import NoBackoff
from redis.retry import Retry

from cdpflow.stack.base import HOST, ProcessComponent, StackError, env_port

DEFAULT_PORT = 6379
PORT_VARIABLE = "CDPFLOW_STACK_REDIS_PORT"


def _quoted(path: Path) -> str:
    # redis.conf splits arguments on spaces; a double-quoted argument may hold them.
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Redis(ProcessComponent):
    """The Redis server of the stack (the identity store and profile store for clusters)."""

    name = "redis"
    program = "redis-server"
    start_timeout = 15.0
    port_variables = {"clients": PORT_VARIABLE}

    def __init__(self, root: Path, port: Optional[int] = None):
        super().__init__(root)
        self.port = env_port(PORT_VARIABLE, DEFAULT_PORT) if port is None else port

    @property
    def ports(self) -> Dict[str, int]:
        return {"clients": self.port}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, db: int = 0) -> str:
        """The URL a client opens, e.g. `redis://127.0.0.1:6379/0`."""
        return f"redis://{self.address}/{db}"

    def config(self) -> str:
        """The text of redis.conf, written anew at each start so a changed port takes effect."""
        return "\n".join([
            f"bind {HOST}",
            f"port {self.port}",
            "protected-mode yes",
            "daemonize yes",
            f"pidfile {_quoted(self.pidfile)}",
            f"logfile {_quoted(self.logfile)}",
            f"dir {_quoted(self.folder)}",
            # Every write reaches the append-only file, fsynced each second: at most a second of
            # writes is lost in a crash, and a clean shutdown (SIGTERM) loses none.
            "appendonly yes",
            "appendfsync everysec",
            # The append-only file is the one copy kept; RDB snapshots would only repeat it.
            'save ""',
            "",
        ])

    def _launch(self, executable: str) -> None:
        conf = self.folder / "redis.conf"
        conf.write_text(self.config())
        # With `daemonize yes` this returns once the server has forked away; a configuration it
        # refuses ends it here, with the reason on its output.
        done = subprocess.run([executable, str(conf)], capture_output=True, text=True, timeout=30,
                              start_new_session=True)
        if done.returncode != 0:
            raise StackError(f"redis-server refused to start (exit {done.returncode}): "
                             f"{(done.stdout + done.stderr).strip() or self.log_tail()}")

    def _answers(self) -> bool:
        # One try with short timeouts: a server that hangs (stopped, swapping, blocked) must read as
        # unhealthy at once, not after the client's default of 5 s a try and 10 retries.
        try:
            with redis_client.Redis(host=HOST, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5,
                                    retry=Retry(NoBackoff(), 0)) as client:
                return client.ping() is True
        except redis_client.RedisError:
            return False
