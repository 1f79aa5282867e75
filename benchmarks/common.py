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
