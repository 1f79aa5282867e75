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
    from cdpflow.models.segmentation import describe, distribution, fit
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
        # what `cdpflow models drift` measures today's profiles against
        "training_distribution": distribution(x, features),
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


SCHEDULES = {"daily": 1, "weekly": 7, "monthly": 30}
DRIFT_THRESHOLD = 0.25


def drift_report(warehouse: str, registry_root: str) -> Optional[Dict[str, Any]]:
    """Population stability of today's profiles against the promoted model's training data
    (None when nothing is promoted): {"version", "trained_at", "psi": {feature: value}, "max"}."""
    from cdpflow.models.registry import ModelRegistry
    from cdpflow.models.segmentation import population_stability
    registry = ModelRegistry(registry_root)
    pointer = registry.promoted()
    if pointer is None:
        return None
    meta = registry.metadata(pointer["version"], pointer["metadata_sha256"])
    features = meta["features"]
    x = np.asarray([feature_vector(r, features) for r in profile_rows(warehouse)], dtype=float)
    psi = population_stability(meta.get("training_distribution") or {}, x, features) if len(x) else {}
    return {"version": meta["version"], "trained_at": meta["trained_at"], "psi": psi,
            "max": max(psi.values(), default=0.0), "profiles": len(x)}


def due(warehouse: str, registry_root: str, schedule: str, threshold: float = DRIFT_THRESHOLD,
        now: Optional[float] = None) -> Tuple[bool, str]:
    """Whether a scheduled `cdpflow train` should train now, and why: nothing promoted yet, the
    promoted model older than the schedule's period, or its features drifted past `threshold`."""
    import calendar
    report = drift_report(warehouse, registry_root)
    if report is None:
        return True, "no model is promoted yet"
    trained = calendar.timegm(time.strptime(report["trained_at"], "%Y-%m-%dT%H:%M:%SZ"))
    age_days = ((now if now is not None else time.time()) - trained) / 86_400
    if age_days >= SCHEDULES[schedule]:
        return True, f"the promoted model {report['version']} is {age_days:.1f} days old ({schedule})"
    if report["max"] >= threshold:
        worst = max(report["psi"], key=report["psi"].get)
        return True, f"drift: {worst} has a population stability index of {report['max']:.3f} (>= {threshold:g})"
    return False, (f"not due: {report['version']} is {age_days:.1f} days old and its largest drift is "
                   f"{report['max']:.3f} (< {threshold:g})")


def shadow_comparison(warehouse: str, registry_root: str) -> Dict[str, Any]:
    """How many profiles the shadowed model would move out of the cluster they are in now
    (their open `cluster:` membership; the promoted model's assignment where they have none)."""
    from cdpflow.errors import BadInput
    from cdpflow.models.registry import ModelRegistry
    from cdpflow.warehouse import open_warehouse
    registry = ModelRegistry(registry_root)
    shadow_pointer, promoted = registry.shadow(), registry.promoted_model()
    if shadow_pointer is None:
        raise BadInput("no model is shadowed: `cdpflow models shadow VERSION` first")
    shadow = registry.load_portable(shadow_pointer["version"], shadow_pointer["metadata_sha256"])
    with open_warehouse(warehouse, read_only=True) as wh:
        rows, memberships = wh.profiles(), wh.memberships()
    held = {m["profile_id"]: m["segment"][len("cluster:"):] for m in memberships
            if m["exited_at"] is None and m["source"] == "model"}
    now = [held.get(r["profile_id"]) for r in rows]
    if promoted is not None:
        fallback = promoted.assign([feature_vector(r, promoted.features) for r in rows])
        now = [name or cluster.name for name, (cluster, _) in zip(now, fallback)]
    then = shadow.assign([feature_vector(r, shadow.features) for r in rows], previous=now)
    moves: Dict[Tuple[str, str], int] = {}
    for before, (after, _) in zip(now, then):
        if before != after.name:
            moves[(before or "(none)", after.name)] = moves.get((before or "(none)", after.name), 0) + 1
    return {"promoted": promoted.version if promoted else None, "shadow": shadow.version, "profiles": len(rows),
            "would_move": sum(moves.values()), "moves": moves}
