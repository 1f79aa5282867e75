"""Customer clusters, engine-free: the feature vector of a profile, and a fitted model in portable form.

`cdpflow train` fits a scikit-learn Pipeline (log1p of skewed counts and money, standard scaling,
KMeans or a Gaussian mixture; `cdpflow.models.segmentation`) and stores beside its joblib file
what scoring needs as plain arrays (`PortableModel`, JSON): the Flink job (whose venv has other
numpy and scikit-learn versions), the batch run and the profile API score with this module and
NumPy alone; the Beam stream scores with the Pipeline itself through RunInference
(`cdpflow.transforms.clusters`); tests check both give the same scores.

Scoring and choosing are two steps, so a stream can batch the first and key the second: a
scoring stage attaches `PortableModel.scored(...)` (scores, version, names, margin) to a row,
and the keyed stage that knows the profile's current cluster chooses (`choose_scored`).

Assignment has hysteresis: a profile keeps the cluster it is in while that cluster is within a
margin of the best one (KMeans: its distance at most (1 + margin) times the nearest; a mixture:
its probability at most `margin` below the best), so a profile near a boundary does not flap.
Labels are stable ids across model versions (`cdpflow.models.segmentation` matches clusters to
the previous model's); each has a readable name, and its segment is `cluster:<name>`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cdpflow.core.timeutil import from_datetime

CATEGORIES = ("running", "footwear", "outdoor", "fitness", "apparel", "accessories", "home")
CAP_DAYS = 730.0  # "no order" or "not seen" counts as this many days ago


def number_of(row: Mapping[str, Any], name: str) -> float:
    value = row.get(name)
    if value is None or isinstance(value, bool):
        return 0.0
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def micros(value: Any) -> Optional[float]:
    """A time as UTC microseconds: a datetime (a warehouse row's) or already a number (a stream row's)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        return float(from_datetime(value))
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _days_since(row: Mapping[str, Any], column: str) -> float:
    at, then = micros(row.get("as_of")), micros(row.get(column))
    if at is None or then is None:
        return CAP_DAYS
    return min(max((at - then) / 86_400e6, 0.0), CAP_DAYS)


def _affinity(row: Mapping[str, Any]) -> Mapping[str, float]:
    value = row.get("category_affinity")
    if isinstance(value, str):
        import json
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, Mapping) else {}


def _share(category: str):
    return lambda row: number_of(_affinity(row), category)


# name -> (how it is read from a profile row, whether the model takes its log1p, what it means)
FEATURE_DEFINITIONS = {
    "orders_365d": (lambda r: number_of(r, "orders_365d"), True, "orders in the last 365 days"),
    "revenue_365d": (lambda r: number_of(r, "revenue_365d"), True, "revenue in the last 365 days"),
    "avg_order_value": (lambda r: number_of(r, "avg_order_value"), True, "average order value, lifetime"),
    "days_since_order": (lambda r: _days_since(r, "last_order_at"), True, "days since the latest order"),
    "days_since_seen": (lambda r: _days_since(r, "last_seen"), True, "days since the latest event"),
    "sessions_365d": (lambda r: number_of(r, "sessions_365d"), True, "browsing sessions in the last 365 days"),
    "product_views_365d": (lambda r: number_of(r, "product_views_365d"), True, "products viewed in the last 365 days"),
    "email_opens_90d": (lambda r: number_of(r, "email_opens_90d"), True, "emails opened in the last 90 days"),
    "email_clicks_90d": (lambda r: number_of(r, "email_clicks_90d"), True, "email links clicked in the last 90 days"),
    "orders_per_session": (lambda r: number_of(r, "orders_365d") / (1.0 + number_of(r, "sessions_365d")), True,
                           "orders per browsing session (365 days)"),
    **{f"share_{c}": (_share(c), False, f"share of {c} in the last 90 days' views, adds and purchases")
       for c in CATEGORIES},
}
FEATURES: Tuple[str, ...] = tuple(FEATURE_DEFINITIONS)


def feature_vector(row: Mapping[str, Any], features: Sequence[str] = FEATURES) -> List[float]:
    """The profile row's features, in `features` order (missing values as 0, days capped)."""
    return [FEATURE_DEFINITIONS[name][0](row) for name in features]


def log_mask(features: Sequence[str]) -> List[bool]:
    return [FEATURE_DEFINITIONS[name][1] for name in features]


def cluster_name(segment: str) -> Optional[str]:
    """The cluster name of a `cluster:<name>` segment (None for any other segment)."""
    return segment[len("cluster:"):] if segment.startswith("cluster:") else None


def choose_index(algorithm: str, margin: float, names: Sequence[str], scores: Sequence[float],
                 previous: Optional[str] = None) -> int:
    """Which cluster a profile is in, from its scores (squared distances for kmeans, probabilities
    for gmm): the best one, unless `previous` (the cluster it is in now, by name) is within the
    margin of it: its distance at most (1 + margin) times the best's, or its probability at most
    `margin` below. The hysteresis that keeps a profile near a boundary from flapping."""
    row = np.asarray(scores, dtype=float)
    best = int(row.argmin() if algorithm == "kmeans" else row.argmax())
    held = list(names).index(previous) if previous in names else None
    if held is not None and held != best:
        if algorithm == "kmeans":
            keeps = math.sqrt(row[held]) <= (1.0 + margin) * math.sqrt(row[best])
        else:
            keeps = row[held] >= row[best] - margin
        if keeps:
            return held
    return best


def choose_scored(scored: Mapping[str, Any], previous: Optional[str] = None) -> Tuple[str, str]:
    """(cluster name, model version) of a row's attached scores (`PortableModel.scored`)."""
    names = list(scored["names"])
    j = choose_index(scored["algorithm"], float(scored["margin"]), names, scored["scores"], previous)
    return names[j], scored["version"]


@dataclass(frozen=True)
class Cluster:
    label: int  # stable across versions
    name: str  # readable, unique within a model; the segment is cluster:<name>
    description: str


@dataclass
class PortableModel:
    """A fitted clustering as arrays: what scoring needs, loadable wherever NumPy is.

    `components[i]` is the Cluster of the model's i-th centroid or mixture component.
    """

    version: str
    algorithm: str  # kmeans | gmm
    features: Tuple[str, ...]
    log: np.ndarray  # bool per feature
    mean: np.ndarray  # the scaler's, after the log
    scale: np.ndarray
    centers: np.ndarray  # k x d, scaled space (KMeans centroids, mixture means)
    components: Tuple[Cluster, ...]
    weights: Optional[np.ndarray] = None  # mixture only
    precisions_cholesky: Optional[np.ndarray] = None  # mixture only: k x d x d (full covariance)
    margin: float = 0.1

    # ------------------------------------------------------------------ scoring
    def transform(self, vectors) -> np.ndarray:
        x = np.asarray(vectors, dtype=float).reshape(-1, len(self.features))
        x = np.where(self.log, np.log1p(np.maximum(x, 0.0)), x)
        return (x - self.mean) / self.scale

    def scores(self, vectors) -> np.ndarray:
        """n x k: squared distances to each centroid (KMeans), or each component's probability (mixture)."""
        z = self.transform(vectors)
        if self.algorithm == "kmeans":
            return ((z[:, None, :] - self.centers[None, :, :]) ** 2).sum(axis=2)
        d = z.shape[1]
        log_prob = np.empty((z.shape[0], len(self.components)))
        for j, chol in enumerate(self.precisions_cholesky):
            y = (z - self.centers[j]) @ chol
            log_det = np.log(np.diag(chol)).sum()
            log_prob[:, j] = -0.5 * (d * np.log(2 * np.pi) + (y ** 2).sum(axis=1)) + log_det + np.log(self.weights[j])
        log_prob -= log_prob.max(axis=1, keepdims=True)
        prob = np.exp(log_prob)
        return prob / prob.sum(axis=1, keepdims=True)

    def best(self, scores: np.ndarray) -> np.ndarray:
        return scores.argmin(axis=1) if self.algorithm == "kmeans" else scores.argmax(axis=1)

    def assign(self, vectors, previous: Sequence[Optional[str]] = ()) -> List[Tuple[Cluster, float]]:
        """(cluster, score) per vector; `previous[i]`: the cluster name the profile is in now (hysteresis)."""
        scores = self.scores(vectors)
        return [self.choose(row, previous[i] if i < len(previous) else None) for i, row in enumerate(scores)]

    def choose(self, scores: Sequence[float], previous: Optional[str] = None) -> Tuple[Cluster, float]:
        """The cluster of one profile from its row of `scores`: the best, unless the cluster named
        `previous` (the one it is in now) is within the margin of it."""
        j = choose_index(self.algorithm, self.margin, [c.name for c in self.components], scores, previous)
        return self.components[j], float(scores[j])

    def cluster_named(self, segment: str) -> Optional[str]:
        """The cluster name of a `cluster:<name>` segment (None for any other segment)."""
        return cluster_name(segment)

    def scored(self, scores: Sequence[float]) -> Dict[str, Any]:
        """One profile's scores with what choosing needs (`choose_scored`), as plain values: what the
        scoring stage of a stream attaches to a row for the keyed stage that knows the current cluster."""
        return {"version": self.version, "algorithm": self.algorithm, "margin": self.margin,
                "names": [c.name for c in self.components], "scores": [float(x) for x in scores]}

    def segment_of(self, cluster: Cluster) -> str:
        return f"cluster:{cluster.name}"

    # ------------------------------------------------------------------ the portable form
    def to_dict(self) -> Dict[str, Any]:
        return {"format": "cdpflow-portable-clusters/1", "version": self.version, "algorithm": self.algorithm,
                "features": list(self.features), "log": self.log.astype(bool).tolist(),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "centers": self.centers.tolist(),
                "components": [{"label": c.label, "name": c.name, "description": c.description} for c in self.components],
                "weights": None if self.weights is None else self.weights.tolist(),
                "precisions_cholesky": None if self.precisions_cholesky is None else self.precisions_cholesky.tolist(),
                "margin": self.margin}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PortableModel":
        if data.get("format") != "cdpflow-portable-clusters/1":
            raise ValueError(f"not a portable cdpflow cluster model (format {data.get('format')!r})")
        unknown = [f for f in data["features"] if f not in FEATURE_DEFINITIONS]
        if unknown:
            raise ValueError(f"the model uses features this cdpflow does not know: {', '.join(unknown)}")
        array = lambda v: None if v is None else np.asarray(v, dtype=float)  # noqa: E731
        return cls(version=data["version"], algorithm=data["algorithm"], features=tuple(data["features"]),
                   log=np.asarray(data["log"], dtype=bool), mean=array(data["mean"]), scale=array(data["scale"]),
                   centers=array(data["centers"]),
                   components=tuple(Cluster(int(c["label"]), c["name"], c["description"]) for c in data["components"]),
                   weights=array(data.get("weights")), precisions_cholesky=array(data.get("precisions_cholesky")),
                   margin=float(data.get("margin", 0.1)))
