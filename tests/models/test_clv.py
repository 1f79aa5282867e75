"""BG/NBD and Gamma-Gamma against the published CDNOW results (the data ships in the Lifetimes wheel)."""
import numpy as np
import pytest

from cdpflow.models.clv import BGNBD, GammaGamma
from tests.conftest import cdnow_file


def test_the_calibration_summary_matches_the_published_one(cdnow):
    published = []
    with open(cdnow_file("cdnow_customers_summary_with_transactions.csv")) as handle:
        next(handle)
        for line in handle:
            _, x, t_x, T, _ = line.strip().split(",")
            published.append((int(x), round(float(t_x), 2), round(float(T), 2)))
    ours = [(s.x, round(s.t_x, 2), round(s.T, 2)) for s in cdnow.values()]
    # the published file renumbers the customers, so the two are compared as multisets
    assert len(ours) == 2357
    assert sorted(ours) == sorted(published)


def test_bgnbd_reproduces_the_published_cdnow_fit(cdnow):
    model = BGNBD.fit(cdnow)
    for fitted, published in ((model.r, 0.243), (model.alpha, 4.414), (model.a, 0.793), (model.b, 2.426)):
        assert fitted == pytest.approx(published, rel=0.01)
    # Sanity of the predictions: a customer with more recent purchases is more likely alive and buys more.
    assert model.probability_alive(2, 30.43, 38.86) > model.probability_alive(2, 5.0, 38.86)
    assert model.expected_purchases(39, 2, 30.43, 38.86) > model.expected_purchases(39, 2, 5.0, 38.86)
    assert float(model.probability_alive(0, 0, 38.86)) == 1.0


def test_gamma_gamma_fits_and_predicts_spend(cdnow):
    model = GammaGamma.fit(cdnow)
    assert model.p > 0 and model.q > 1 and model.v > 0
    repeaters = [s for s in cdnow.values() if s.x > 0]
    predicted = model.expected_spend([s.x for s in repeaters], [s.monetary for s in repeaters])
    # shrinkage towards the population mean: predictions lie between each customer's mean and the mean
    population = np.mean([s.monetary for s in repeaters])
    own = np.array([s.monetary for s in repeaters])
    assert np.all((predicted - own) * (population - own) >= -1e-9)
