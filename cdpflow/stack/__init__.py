"""`cdpflow stack`: the project's own supervisor of the local services the tests and the demo use.

    cdpflow stack up [COMPONENT ...]       start them (default: every default component), idempotent
    cdpflow stack status [COMPONENT ...]   running / stopped / unhealthy; exit 1 if a started one is unhealthy
    cdpflow stack down [COMPONENT ...]     stop them (default: every component)

Everything listens on 127.0.0.1. Data lives under `.stack/` at the project root (git-ignored),
one folder per component, or under `CDPFLOW_STACK_DIR`. Installing the programs is `make`'s job
(`make stack`, `make test`), never this package's. Redis, Kafka, Flink and the BigQuery
emulator are the components.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Type

from cdpflow.errors import BadInput
from cdpflow.stack.base import (RUNNING, STOPPED, UNHEALTHY, Component, ComponentStatus, StackError,
                                project_root)
from cdpflow.stack.bigquery import BigQueryEmulator
from cdpflow.stack.flink import Flink
from cdpflow.stack.kafka import Kafka
from cdpflow.stack.redis import Redis

# In start order; `down` stops them in the reverse order (a consumer before what it consumes).
COMPONENTS: Dict[str, Type[Component]] = {"redis": Redis, "kafka": Kafka, "flink": Flink, "bigquery": BigQueryEmulator}
# Flink takes 5 GiB and three JVMs, the BigQuery emulator half a GiB: started when asked for
# (`cdpflow stack up flink bigquery`).
DEFAULT_COMPONENTS = ("redis", "kafka")

__all__ = ["COMPONENTS", "DEFAULT_COMPONENTS", "RUNNING", "STOPPED", "UNHEALTHY", "Component", "ComponentStatus",
           "StackError", "components", "down", "stack_dir", "status", "up"]


def stack_dir() -> Path:
    """The stack's data folder: `CDPFLOW_STACK_DIR`, or `.stack/` at the project root."""
    configured = os.environ.get("CDPFLOW_STACK_DIR")
    if configured:
        return Path(configured).resolve()
    return project_root() / ".stack"


def components(names: Optional[Sequence[str]] = None, root: Optional[Path] = None,
               default: Sequence[str] = tuple(COMPONENTS)) -> List[Component]:
    """The named components (or `default`), in start order.

    Raises:
        BadInput: a name that is not a component of the stack.
    """
    wanted = list(names) if names else list(default)
    unknown = [name for name in wanted if name not in COMPONENTS]
    if unknown:
        raise BadInput(f"unknown stack component(s): {', '.join(unknown)} (the stack has: {', '.join(COMPONENTS)})")
    root = stack_dir() if root is None else root
    return [COMPONENTS[name](root) for name in COMPONENTS if name in wanted]


def up(names: Optional[Sequence[str]] = None, root: Optional[Path] = None,
       timeout: Optional[float] = None) -> Dict[str, bool]:
    """Starts the named components (default: `DEFAULT_COMPONENTS`), each once healthy.

    Returns:
        For each component, whether it was started (False: it was running and healthy already).
    Raises:
        StackError: one did not come up; those before it stay up.
    """
    return {c.name: c.up(timeout) for c in components(names, root, DEFAULT_COMPONENTS)}


def down(names: Optional[Sequence[str]] = None, root: Optional[Path] = None) -> Dict[str, bool]:
    """Stops the named components (default: all), in reverse start order.

    Returns:
        For each component, whether it was running (False: nothing to stop).
    """
    return {c.name: c.down() for c in reversed(components(names, root))}


def status(names: Optional[Sequence[str]] = None, root: Optional[Path] = None) -> List[ComponentStatus]:
    """The status of the named components (default: all), in start order."""
    return [c.status() for c in components(names, root)]
