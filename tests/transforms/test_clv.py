import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms.clv import COLUMNS, MODELS, PROFILES, PredictCustomerValue
from tests.conftest import local_pipeline


def rows_from(summary):
    rows = [{"profile_id": c, "_history": (s.x, s.t_x, s.T, s.monetary)} for c, s in sorted(summary.items())]
    return rows + [{"profile_id": "prospect", "_history": None}]


def test_the_stage_fits_once_and_scores_every_profile(cdnow):
    p = local_pipeline()
    out = p | beam.Create(rows_from(cdnow)) | PredictCustomerValue(p | "AsOf" >> beam.Create([0]))

    def check_model(model):
        assert model["status"] == "fitted" and model["customers"] == 2357
        for key, published in (("r", 0.243), ("alpha", 4.414), ("a", 0.793), ("b", 2.426)):
            assert model[key] == pytest.approx(published, rel=0.01)
        return True

    def check_rows(rows):
        by_id = {r["profile_id"]: r for r in rows}
        assert len(rows) == 2358
        assert all(by_id["prospect"][c] is None for c in COLUMNS) and by_id["prospect"]["clv_model_id"] is None
        scored = [r for r in rows if r["profile_id"] != "prospect"]
        assert all(r["clv_model_id"] and 0 <= r["probability_alive"] <= 1 and r["clv_90d"] >= 0 for r in scored)
        # more recent repeat purchases, same count: a higher chance of being alive
        same_x = sorted((r for r in scored if r["_history"][0] == 2), key=lambda r: r["_history"][1])
        assert same_x[-1]["probability_alive"] > same_x[0]["probability_alive"]
        return True

    assert_that(out[MODELS] | beam.Map(check_model), equal_to([True]), label="Model")
    assert_that(out[PROFILES] | beam.combiners.ToList() | beam.Map(check_rows), equal_to([True]), label="Rows")
    p.run().wait_until_finish()


def test_too_few_customers_leave_the_predictions_empty_and_say_why():
    rows = [{"profile_id": f"p{i}", "_history": (1, 1.0, 10.0, 20.0)} for i in range(10)]
    p = local_pipeline()
    out = p | beam.Create(rows) | PredictCustomerValue(p | "AsOf" >> beam.Create([0]))
    assert_that(out[MODELS] | beam.Map(lambda m: m["status"].startswith("not fitted: 10 customers")), equal_to([True]),
                label="Model")
    assert_that(out[PROFILES] | beam.Map(lambda r: r["clv_90d"]), equal_to([None] * 10), label="Rows")
    p.run().wait_until_finish()
