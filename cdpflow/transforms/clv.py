"""PredictCustomerValue: BG/NBD and Gamma-Gamma fitted over every profile, applied to each.

Input: PCollection[dict] of profile rows from ComputeFeatures (with `_history`: the profile's
(x, t_x, T, mean repeat value) in weeks, or None without orders). Outputs:
  `profiles`: the rows with expected_purchases_30d/90d, probability_alive, expected_order_value,
      clv_90d and clv_model_id (null where the profile has no order or no model could be fitted),
  `clv_models`: one row describing the fit.
The fit runs once, on one worker, over the small histories; scoring runs in batches
(BatchElements) so that the model is evaluated vectorised, never one row a call.
"""
from __future__ import annotations

import hashlib
import json
import time

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.models.clv import SCORED_COLUMNS as COLUMNS, fit_models, score_rows

PROFILES, MODELS = "profiles", "clv_models"


def _describe(model, as_of):
    params = {k: model.get(k) for k in ("r", "alpha", "a", "b", "p", "q", "v")}
    model_id = "clv-" + hashlib.sha256(json.dumps([as_of, params, model["status"]], sort_keys=True).encode()).hexdigest()[:12]
    return dict(model, model_id=model_id, as_of=as_of, fitted_at=int(time.time() * 1_000_000), **params)


class _ScoreFn(beam.DoFn):
    """Scores batches of rows; the model comes as a side input (batch) or is fixed (a stream
    applies the model the batch job last fitted)."""

    def __init__(self, model=None):
        self.model = model
        self.scored = Metrics.counter(self.__class__, "scored")
        self.batch = Metrics.distribution(self.__class__, "batch_size")

    def process(self, rows, model=None):
        model = self.model if model is None else model
        self.batch.update(len(rows))
        out, scored = score_rows(model, rows)
        self.scored.inc(scored)
        yield from out


class PredictCustomerValue(beam.PTransform):
    """PCollection[dict] (profile rows) -> {'profiles', 'clv_models'}.

    Args:
      as_of: singleton PCollection, UTC microseconds (recorded with the model).
    """

    def __init__(self, as_of):
        super().__init__()
        self.as_of = as_of

    def expand(self, profiles):
        model = (profiles
                 | "Histories" >> beam.FlatMap(lambda r: [r["_history"]] if r.get("_history") is not None else [])
                 | "AllHistories" >> beam.combiners.ToList()
                 | "Fit" >> beam.Map(lambda histories, as_of: _describe(fit_models(histories), as_of),
                                     beam.pvalue.AsSingleton(self.as_of)))
        scored = (profiles
                  | "Batch" >> beam.BatchElements(min_batch_size=100, max_batch_size=2000)
                  | "Score" >> beam.ParDo(_ScoreFn(), pvalue.AsSingleton(model)))
        return {PROFILES: scored, MODELS: model}
