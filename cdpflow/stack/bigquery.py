"""The BigQuery emulator in the local stack: PyPI's local-bigquery on 127.0.0.1.

`cdpflow stack up bigquery` starts `local-bigquery serve` from its own venv (`make
bigquery-emulator`: Python 3.13, DuckDB 1.5.5) with its data in `.stack/bigquery/data`. DuckDB
under it finds its extensions (icu, ducklake, spatial) in `.cache/bigquery-home`, which the
emulator gets as its HOME, so nothing is downloaded at run time. The REST port is 9050 (the
official client's `api_endpoint`), the Storage API's gRPC port 9060, unless
`CDPFLOW_STACK_BIGQUERY_PORT` / `CDPFLOW_STACK_BIGQUERY_GRPC_PORT` say otherwise.

A warehouse on it: `bigquery://PROJECT/DATASET?endpoint=http://127.0.0.1:9050` (any project id
works), or the endpoint in `CDPFLOW_BIGQUERY_ENDPOINT`. What it does not model is in
docs/bigquery.md (the streaming buffer, DML quotas and concurrency limits, insertId memory that
does not survive a restart).
"""
from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional

from cdpflow.stack.base import HOST, ProcessComponent, env_port, project_root

PORT_VARIABLE, GRPC_PORT_VARIABLE = "CDPFLOW_STACK_BIGQUERY_PORT", "CDPFLOW_STACK_BIGQUERY_GRPC_PORT"
PROJECT = "local"


def emulator_venv() -> Path:
    """The emulator's venv (`make bigquery-emulator`), or `CDPFLOW_BIGQUERY_VENV`."""
    configured = os.environ.get("CDPFLOW_BIGQUERY_VENV")
    return Path(configured).resolve() if configured else project_root() / ".cache" / "bigquery-venv"


def emulator_home() -> Path:
    """The HOME the emulator runs with: DuckDB's extensions in `.duckdb/extensions/` (`make bigquery-emulator`)."""
    return emulator_venv().parent / "bigquery-home"


class BigQueryEmulator(ProcessComponent):
    """The BigQuery emulator of the stack (a warehouse backend, reached through the official client)."""

    name = "bigquery"
    program = "local-bigquery"
    start_timeout = 60.0
    port_variables = {"rest": PORT_VARIABLE, "grpc": GRPC_PORT_VARIABLE}

    def __init__(self, root: Path, port: Optional[int] = None, grpc_port: Optional[int] = None):
        super().__init__(root)
        self.port = env_port(PORT_VARIABLE, 9050) if port is None else port
        self.grpc_port = env_port(GRPC_PORT_VARIABLE, 9060) if grpc_port is None else grpc_port

    @property
    def ports(self) -> Dict[str, int]:
        return {"rest": self.port, "grpc": self.grpc_port}

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def endpoint(self) -> str:
        """The official client's `api_endpoint`."""
        return f"http://{self.address}"

    def warehouse_uri(self, dataset: str, project: str = PROJECT) -> str:
        return f"bigquery://{project}/{dataset}?endpoint={self.endpoint()}"

    def executable(self) -> Optional[str]:
        found = emulator_venv() / "bin" / self.program
        return str(found) if found.exists() else None

    def _launch(self, executable: str) -> None:
        data = self.folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HOME=str(emulator_home()))
        with open(self.logfile, "ab") as out:
            process = subprocess.Popen([executable, "serve", "--host", HOST, "--port", str(self.port), "--grpc-port",
                                        str(self.grpc_port), "--project", PROJECT, "--data-dir", str(data)],
                                       cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        # It writes no pidfile of its own: the stack records the process it started.
        self.pidfile.write_text(f"{process.pid}\n")

    def _is_ours(self, cmdline: bytes) -> bool:
        return self.program.encode() in cmdline and str(self.folder / "data").encode() in cmdline

    def _answers(self) -> bool:
        # A real call, not an open port: the emulator opens its storage on the first request, and
        # a second one on the same data opens its port but answers every call with an error.
        try:
            with urllib.request.urlopen(f"{self.endpoint()}/bigquery/v2/projects/{PROJECT}/datasets",
                                        timeout=5) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False
