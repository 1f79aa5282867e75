"""Predictive traits: BG/NBD (expected purchases, probability alive) and Gamma-Gamma (spend, CLV).

Plain NumPy/SciPy implementations of Fader, Hardie & Lee (2005), "Counting your customers the
easy way: an alternative to the Pareto/NBD model", and Fader, Hardie & Lee (2005), "RFM and
CLV: using iso-value curves for customer base analysis". Fitted by maximum likelihood over a
calibration summary per customer:

    x    repeat purchases in the calibration period (purchases after the first, one per period),
    t_x  time of the last purchase, from the first,
    T    time from the first purchase to the end of calibration,
    m    mean value of the repeat purchases (Gamma-Gamma only, customers with x > 0).

Run the fit with `cdpflow train clv` (see cli.py); `tests/models/test_clv.py` checks it against
the published CDNOW parameters.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from typing import Dict, Iterable, Mapping, Tuple

import numpy as np
from scipy import optimize, special


@dataclass(frozen=True)
class CustomerSummary:
    x: int
    t_x: float
    T: float
    monetary: float  # mean value of repeat purchases (0 if none)


def calibration_summary(transactions: Iterable[Tuple[str, date, float]], end: date,
                        unit_days: float = 7.0) -> Dict[str, CustomerSummary]:
    """Per customer (x, t_x, T, mean repeat value) from (customer, day, amount) transactions up to `end`.

    Purchases on one day count as one (their amounts add up), as in the published CDNOW
    summary. Times are in units of `unit_days` (weeks by default).
    """
    days: Dict[str, Dict[date, float]] = defaultdict(lambda: defaultdict(float))
    for customer, day, amount in transactions:
        if day <= end:
            days[customer][day] += amount
    summary = {}
    for customer, by_day in days.items():
        ordered = sorted(by_day)
        first, last = ordered[0], ordered[-1]
        repeats = [by_day[d] for d in ordered[1:]]
        summary[customer] = CustomerSummary(
            x=len(repeats), t_x=(last - first).days / unit_days, T=(end - first).days / unit_days,
            monetary=float(np.mean(repeats)) if repeats else 0.0)
    return summary


def _arrays(summary: Mapping[str, CustomerSummary]):
    values = list(summary.values())
    return (np.array([s.x for s in values], float), np.array([s.t_x for s in values], float),
            np.array([s.T for s in values], float))


@dataclass(frozen=True)
class BGNBD:
    """The fitted BG/NBD model: purchase rate ~ Gamma(r, alpha), dropout ~ Beta(a, b)."""

    r: float
    alpha: float
    a: float
    b: float

    @staticmethod
    def log_likelihood(params, x, t_x, T) -> np.ndarray:
        r, alpha, a, b = params
        ln_a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
        ln_a2 = special.gammaln(a + b) + special.gammaln(b + x) - special.gammaln(b) - special.gammaln(a + b + x)
        ln_a3 = -(r + x) * np.log(alpha + T)
        with np.errstate(divide="ignore"):
            ln_a4 = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-300)) - (r + x) * np.log(alpha + t_x),
                             -np.inf)
        return ln_a1 + ln_a2 + np.logaddexp(ln_a3, ln_a4)

    @classmethod
    def fit(cls, summary: Mapping[str, CustomerSummary]) -> "BGNBD":
        """Maximum-likelihood fit (Nelder-Mead on the log parameters, then a polish with L-BFGS-B)."""
        x, t_x, T = _arrays(summary)

        def negative(log_params):
            return -np.sum(cls.log_likelihood(np.exp(log_params), x, t_x, T))
        start = np.log([1.0, max(float(np.mean(T)), 1e-3), 1.0, 1.0])
        first = optimize.minimize(negative, start, method="Nelder-Mead",
                                  options={"maxiter": 20000, "xatol": 1e-8, "fatol": 1e-10})
        polished = optimize.minimize(negative, first.x, method="L-BFGS-B")
        best = polished if polished.fun <= first.fun else first
        return cls(*map(float, np.exp(best.x)))

    def expected_purchases(self, t: float, x, t_x, T) -> np.ndarray:
        """Expected purchases in the next `t` time units for customers with history (x, t_x, T)."""
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        x, t_x, T = (np.asarray(v, float) for v in (x, t_x, T))
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, t / (alpha + T + t))
        first = (a + b + x - 1) / (a - 1) * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp)
        return first / (1 + (x > 0) * a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x))

    def probability_alive(self, x, t_x, T) -> np.ndarray:
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        x, t_x, T = (np.asarray(v, float) for v in (x, t_x, T))
        return np.where(x > 0, 1 / (1 + a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)), 1.0)


@dataclass(frozen=True)
class GammaGamma:
    """The fitted Gamma-Gamma spend model: per-transaction value ~ Gamma(p, nu), nu ~ Gamma(q, v)."""

    p: float
    q: float
    v: float

    @staticmethod
    def log_likelihood(params, x, m) -> np.ndarray:
        p, q, v = params
        return (special.gammaln(p * x + q) - special.gammaln(p * x) - special.gammaln(q) + q * np.log(v)
                + (p * x - 1) * np.log(m) + p * x * np.log(x) - (p * x + q) * np.log(x * m + v))

    @classmethod
    def fit(cls, summary: Mapping[str, CustomerSummary]) -> "GammaGamma":
        rows = [s for s in summary.values() if s.x > 0 and s.monetary > 0]
        x = np.array([s.x for s in rows], float)
        m = np.array([s.monetary for s in rows], float)

        def negative(log_params):
            return -np.sum(cls.log_likelihood(np.exp(log_params), x, m))
        best = optimize.minimize(negative, np.log([1.0, 1.0, max(float(np.mean(m)), 1e-3)]), method="Nelder-Mead",
                                 options={"maxiter": 20000, "xatol": 1e-8, "fatol": 1e-10})
        return cls(*map(float, np.exp(best.x)))

    def expected_spend(self, x, m) -> np.ndarray:
        """Expected value of a customer's future transactions given x repeats with mean value m."""
        p, q, v = self.p, self.q, self.v
        x, m = np.asarray(x, float), np.asarray(m, float)
        return (p * (v + x * m)) / (p * x + q - 1)


def history_from_days(order_days: Mapping[int, float], as_of_day: int, unit_days: float = 7.0):
    """(x, t_x, T, mean repeat value) from {epoch day: revenue of that day's orders}, or None without orders.

    The same conventions as `calibration_summary`: one purchase per day, weeks as the unit.
    """
    days = sorted(d for d in order_days if d <= as_of_day)
    if not days:
        return None
    repeats = [float(order_days[d]) for d in days[1:]]
    return (len(repeats), (days[-1] - days[0]) / unit_days, (as_of_day - days[0]) / unit_days,
            float(np.mean(repeats)) if repeats else 0.0)


MIN_CUSTOMERS = 100  # fewer than this and the fit says more about noise than about customers
MIN_REPEATERS = 20


def fit_models(histories) -> Dict[str, object]:
    """Fits BG/NBD and Gamma-Gamma on (x, t_x, T, m) histories; a dict of parameters and a status."""
    summary = {str(i): CustomerSummary(int(x), float(t_x), float(T), float(m))
               for i, (x, t_x, T, m) in enumerate(histories)}
    repeaters = sum(1 for s in summary.values() if s.x > 0 and s.monetary > 0)
    if len(summary) < MIN_CUSTOMERS or repeaters < MIN_REPEATERS:
        return {"status": f"not fitted: {len(summary)} customers with orders, {repeaters} repeat buyers "
                          f"(needs {MIN_CUSTOMERS} and {MIN_REPEATERS})", "customers": len(summary)}
    bg, gg = BGNBD.fit(summary), GammaGamma.fit(summary)
    params = {"r": bg.r, "alpha": bg.alpha, "a": bg.a, "b": bg.b, "p": gg.p, "q": gg.q, "v": gg.v}
    if not all(np.isfinite(v) and v > 0 for v in params.values()) or gg.q <= 1:
        return {"status": "not fitted: the optimiser did not converge to valid parameters", "customers": len(summary)}
    return {"status": "fitted", "customers": len(summary), **params}


def score(model: Mapping[str, object], histories) -> Dict[str, np.ndarray]:
    """Predictions for a batch of (x, t_x, T, m) histories (vectorised: one call per batch, not per row)."""
    x, t_x, T, m = (np.array(column, float) for column in zip(*histories))
    bg = BGNBD(model["r"], model["alpha"], model["a"], model["b"])
    gg = GammaGamma(model["p"], model["q"], model["v"])
    population_spend = gg.p * gg.v / (gg.q - 1)
    spend = np.where(x > 0, gg.expected_spend(np.maximum(x, 1), np.where(m > 0, m, 1.0)), population_spend)
    in_90 = bg.expected_purchases(90 / 7, x, t_x, T)
    return {"expected_purchases_30d": bg.expected_purchases(30 / 7, x, t_x, T),
            "expected_purchases_90d": in_90,
            "probability_alive": bg.probability_alive(x, t_x, T),
            "expected_order_value": spend,
            "clv_90d": in_90 * spend}


SCORED_COLUMNS = ("expected_purchases_30d", "expected_purchases_90d", "probability_alive", "expected_order_value",
                  "clv_90d")


def score_rows(model: Mapping[str, object], rows) -> Tuple[list, int]:
    """Profile rows with the model's predictions, scored as one batch; (rows, how many were scored).

    A row's `_history` (from `history_from_days`; None without orders) is what is scored; rows
    without one, or a model that is not fitted, get null predictions and no `clv_model_id`.
    Engine-free: the Beam stream's and the Flink job's scoring stages both call it per batch.
    """
    rows = list(rows)
    with_history = [r for r in rows if r.get("_history") is not None]
    fitted = model.get("status") == "fitted"
    predictions = score(model, [r["_history"] for r in with_history]) if with_history and fitted else None
    scored = {}
    if predictions is not None:
        for i, row in enumerate(with_history):
            scored[id(row)] = {c: round(float(predictions[c][i]), 6) for c in SCORED_COLUMNS}
    out = []
    for row in rows:
        values = scored.get(id(row))
        done = dict(row, **(values or {c: None for c in SCORED_COLUMNS}))
        done["clv_model_id"] = model.get("model_id") if values else None
        out.append(done)
    return out, len(scored)
