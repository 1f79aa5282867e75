"""What the benchmarks share: the machine they ran on, and where their figures go (benchmarks/results/<name>.json, not committed)."""
from __future__ import annotations

import json
import os
import platform
from typing import Any, Dict

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> Dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version()}


def save_results(name: str, results: Dict[str, Any]) -> str:
    """Writes the results as benchmarks/results/<name>.json; returns the path."""
    os.makedirs(FOLDER, exist_ok=True)
    path = os.path.join(FOLDER, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    return path


def start_collector(bootstrap: str, folder, write_key: str = "wk_bench"):
    """The collector as its own process (`cdpflow serve collector`) on a free port; returns (process, URL)."""
    import subprocess
    import sys
    import time

    import requests

    from cdpflow.stack.base import free_port
    config = os.path.join(str(folder), "collector.yaml")
    with open(config, "w") as handle:
        handle.write(f"collector:\n  write_keys: {{{write_key}: bench}}\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", "serve", "collector", "--port", str(port),
                                "--bootstrap", bootstrap, "--config", config],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"the collector did not start: {process.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
