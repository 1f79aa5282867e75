"""Cluster scoring in the Beam stream: RunInference with Beam's scikit-learn handler, following the
registry's promoted model.

    profile rows -> Partition (deletions pass) -> RunInference(PromotedClusterModelHandler)
        -> rows with `_clusters` (scores, the model's version) -> AssignSegmentsStream's keyed stage

Batched by RunInference (up to 500 rows a call); the keyed stage chooses the cluster with the
profile's current one in mind (hysteresis, `cdpflow.core.clusters.choose_scored`), so the
choice is the same as the batch run's, the Flink job's and the API's. Imported only when a
registry is configured (it imports scikit-learn).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam.ml.inference.sklearn_inference import ModelFileType, SklearnModelHandlerNumpy

from cdpflow.models.registry import follow_models, score_rows


def _score_rows(followed, batch, inference_args=None):
    """The inference function: a batch of profile rows scored by the promoted model (and the shadow
    one beside it), each result `PortableModel.scored` (None while nothing is promoted)."""
    scored = score_rows(followed.get(), batch)
    return scored if scored is not None else [None] * len(batch)


class PromotedClusterModelHandler(SklearnModelHandlerNumpy):
    """Beam's scikit-learn handler over the registry's promoted model, followed.

    The model `RunInference` loads once per worker is the registry followed
    (`cdpflow.models.registry.follow_models`): its promoted pointer is re-read every
    `every_s` seconds and a newly promoted (or rolled back) version's joblib Pipeline is
    unpickled once its checksums match, so a promotion reaches a running stream without a
    restart (Beam's own model updates ride on a periodic side input, which Prism refuses).
    Examples are profile rows, not vectors: the features belong to the model version in
    force, so the inference function builds the vectors with that version's feature list.
    """

    def __init__(self, registry: str, every_s: float = 10.0, max_batch_size: int = 500):
        super().__init__(registry, ModelFileType.JOBLIB, inference_fn=_score_rows, min_batch_size=1,
                         max_batch_size=max_batch_size)
        self.every_s = every_s

    def load_model(self):
        return follow_models(self._model_uri, self.every_s, pipelines=True)

    def get_metrics_namespace(self) -> str:
        return "cdpflow_clusters"


def _with_clusters(result):
    row = result.example
    return dict(row, _clusters=result.inference) if result.inference is not None else row


class ScoreClustersStream(beam.PTransform):
    """PCollection[profile rows and deletion rows] -> the same rows, each scored row carrying
    `_clusters` (the promoted model's scores and version, `PortableModel.scored`), through
    RunInference in batches. Deletion rows pass unscored."""

    def __init__(self, registry: str, every_s: float = 10.0):
        super().__init__()
        self.registry, self.every_s = registry, every_s

    def expand(self, rows):
        from apache_beam.ml.inference.base import RunInference
        deleted, live = rows | "Deleted" >> beam.Partition(lambda r, _: 0 if r.get("deleted") else 1, 2)
        scored = (live
                  | "RunInference" >> RunInference(PromotedClusterModelHandler(self.registry, self.every_s))
                  | "WithClusters" >> beam.Map(_with_clusters))
        return (deleted, scored) | "AllRows" >> beam.Flatten()
