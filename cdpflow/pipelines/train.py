"""`cdpflow train`: a batch Beam pipeline that fits the customer clusters and stores a model version.

    cdpflow train --warehouse out/cdp.duckdb --registry out/models [--algorithm kmeans|gmm] [--k 3..10]
                  [--seed 0] [--promote] [--runner direct|prism|DataflowRunner ...]

Reads every profile through the `Warehouse` interface, turns each into its feature vector
(`cdpflow.core.clusters`), gathers them, fits the scikit-learn Pipeline for each k in the range
and keeps the best (`cdpflow.models.segmentation`), and stores the Pipeline (joblib), its
portable arrays and its metadata in the registry (`cdpflow.models.registry`). The new clusters
keep the labels and names of the promoted model's nearest clusters. `--promote` promotes it.
"""
from __future__ import annotations

import platform
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cdpflow.core.clusters import FEATURES, feature_vector


def new_version(seed: int) -> str:
    import uuid
    return time.strftime("seg-%Y%m%d-%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"


def library_versions() -> Dict[str, str]:
    import joblib
    import scipy
    import sklearn
    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__, "joblib": joblib.__version__}


def fit_and_store(vectors: Sequence[Sequence[float]], registry_root: str, version: str, algorithm: str,
                  k_range: Tuple[int, int], seed: int, margin: float, window: Mapping[str, Any],
                  features: Sequence[str] = FEATURES) -> Dict[str, Any]:
    """Fits, describes (labels matched to the promoted model) and stores one version; returns its metadata."""
    from cdpflow.models.registry import ModelRegistry
    from cdpflow.models.segmentation import describe, fit
    registry = ModelRegistry(registry_root)
    x = np.asarray(vectors, dtype=float)
    parent = registry.promoted()
    previous = registry.promoted_model() if parent else None
    fitted = fit(x, algorithm, k_range, seed, features, previous=previous)
    portable = describe(fitted, version, features, previous, margin)
    assigned = portable.best(portable.scores(x))
    sizes = {portable.components[j].name: int((assigned == j).sum()) for j in range(len(portable.components))}
    metadata = {
        "version": version, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "algorithm": algorithm, "k": fitted.k, "k_range": list(k_range), "seed": seed, "margin": margin,
        "features": list(features), "libraries": library_versions(), "training_window": dict(window),
        "metrics": {"criterion": fitted.criterion, "by_k": {str(k): v for k, v in fitted.scores.items()},
                    "chosen": fitted.scores[fitted.k]},
        "parent": parent["version"] if parent else None,
        "clusters": [{"label": c.label, "name": c.name, "segment": portable.segment_of(c),
                      "description": c.description, "size": sizes[c.name]} for c in portable.components],
    }
    return registry.save(fitted.pipeline, portable, metadata)


def profile_rows(warehouse: str) -> List[Dict[str, Any]]:
    from cdpflow.warehouse import open_warehouse
    with open_warehouse(warehouse, read_only=True) as wh:
        return wh.profiles()


def _window(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    from cdpflow.core.clusters import micros
    from cdpflow.core.timeutil import format_ts
    stamps = [s for s in (micros(r.get("as_of")) for r in rows) if s is not None]
    seen = [s for s in (micros(r.get("first_seen")) for r in rows) if s is not None]
    return {"profiles": len(rows), "as_of": format_ts(int(max(stamps))) if stamps else None,
            "first_seen": format_ts(int(min(seen))) if seen else None}


def run_training(warehouse: str, registry: str, algorithm: str = "kmeans", k_range: Tuple[int, int] = (3, 10),
                 seed: int = 0, margin: float = 0.1, runner: str = "direct",
                 pipeline_args: Sequence[str] = (), rows: Optional[Sequence[Mapping[str, Any]]] = None
                 ) -> Dict[str, Any]:
    """Runs the training pipeline; returns the stored version's metadata."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from cdpflow.errors import BadInput
    from cdpflow.models.registry import ModelRegistry
    from cdpflow.runners.direct import runner_for
    rows = list(rows) if rows is not None else profile_rows(warehouse)
    if len(rows) <= k_range[1]:
        raise BadInput(f"{len(rows)} profiles in {warehouse}: too few for {k_range[1]} clusters")
    version = new_version(seed)
    window = _window(rows)
    engine, args = runner_for(runner, list(pipeline_args))
    with beam.Pipeline(runner=engine, options=PipelineOptions(args)) as pipeline:
        _ = (pipeline
             | "Profiles" >> beam.Create(rows, reshuffle=False)
             | "Features" >> beam.Map(feature_vector)
             | "Gather" >> beam.combiners.ToList()
             | "FitAndStore" >> beam.Map(fit_and_store, registry, version, algorithm, tuple(k_range), seed, margin,
                                         window))
    return ModelRegistry(registry).metadata(version)
