"""Enrich: product catalog, reporting-currency revenue, user agent, UTM campaign.

Input: PCollection[NormalizedEvent]; output: the same events with `enrichment` (device/OS/
browser, campaign, products with category and brand) and `revenue_reporting` set. The catalog
and the rates are side inputs in batch (`LoadReferenceData` reads them once); the stream uses
`EnrichFromFiles`, which loads them in each worker's setup.
"""
from __future__ import annotations

from typing import Callable, Optional

import apache_beam as beam
from apache_beam.metrics import Metrics

from cdpflow.core.enrich import Rates, enrich_event, load_catalog
from cdpflow.schemas.records import NormalizedEvent


class LoadReferenceData(beam.PTransform):
    """PBegin -> a one-element PCollection holding `loader(path)` (for use as a singleton side input)."""

    def __init__(self, path: Optional[str], loader: Callable):
        super().__init__()
        self.path = path
        self.loader = loader

    def expand(self, pbegin):
        return pbegin | "Path" >> beam.Create([self.path]) | "Load" >> beam.Map(self.loader)


class _EnrichFn(beam.DoFn):
    def __init__(self):
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.no_rate = Metrics.counter(self.__class__, "revenue_without_rate")
        self.unknown_products = Metrics.counter(self.__class__, "products_not_in_catalog")

    def process(self, event: NormalizedEvent, catalog, rates: Rates):
        self.received.inc()
        enriched, unknown, no_rate = enrich_event(event, catalog, rates)
        self.unknown_products.inc(unknown)
        if no_rate:
            self.no_rate.inc()
        self.succeeded.inc()
        yield enriched


class Enrich(beam.PTransform):
    """PCollection[NormalizedEvent] -> PCollection[NormalizedEvent], enriched.

    Args:
      catalog: PCollection with one catalog dict (see `cdpflow.core.enrich.load_catalog`).
      rates: PCollection with one `Rates`.
    """

    def __init__(self, catalog, rates):
        super().__init__()
        self.catalog = catalog
        self.rates = rates

    def expand(self, events):
        return events | "Enrich" >> beam.ParDo(
            _EnrichFn(), beam.pvalue.AsSingleton(self.catalog), beam.pvalue.AsSingleton(self.rates)
        ).with_input_types(NormalizedEvent, dict, Rates).with_output_types(NormalizedEvent)


class _EnrichLoadedFn(_EnrichFn):
    def __init__(self, catalog_path: Optional[str], rates_path: Optional[str], reporting_currency: str):
        super().__init__()
        self.paths = (catalog_path, rates_path)
        self.reporting_currency = reporting_currency

    def setup(self):
        self.catalog = load_catalog(self.paths[0])
        self.rates = Rates.load(self.paths[1], self.reporting_currency)

    def process(self, event: NormalizedEvent):
        return super().process(event, self.catalog, self.rates)


class EnrichFromFiles(beam.PTransform):
    """Enrich for a stream: each worker loads the catalog and rates files once, in setup.

    Why not side inputs: a streaming runner may hand the first events to the DoFn before a
    side input has any value (Prism does), and reference files change by redeploying anyway.
    """

    def __init__(self, catalog_path: Optional[str], rates_path: Optional[str], reporting_currency: str):
        super().__init__()
        self.fn = _EnrichLoadedFn(catalog_path, rates_path, reporting_currency)

    def expand(self, events):
        return events | "Enrich" >> beam.ParDo(self.fn).with_input_types(NormalizedEvent).with_output_types(NormalizedEvent)


def rates_loader(reporting_currency: str) -> Callable[[Optional[str]], Rates]:
    return lambda path: Rates.load(path, reporting_currency)


__all__ = ["Enrich", "EnrichFromFiles", "LoadReferenceData", "load_catalog", "rates_loader"]
