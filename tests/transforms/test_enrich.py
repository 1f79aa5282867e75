from decimal import Decimal

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.core.enrich import Rates
from cdpflow.transforms.enrich import Enrich, LoadReferenceData, rates_loader
from tests.conftest import local_pipeline
from tests.transforms.helpers import normalized

UA = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36"


def test_enrich_joins_catalog_rates_user_agent_and_campaign(tmp_path):
    rates = tmp_path / "rates.csv"
    rates.write_text("date,currency,rate\n2026-02-27,GBP,1.25\n2026-03-01,GBP,1.30\n")
    order = normalized(messageId="o", userId="u", event="Order Completed",
                       properties={"revenue": "10.00", "currency": "GBP", "products": [{"product_id": "p1"}]},
                       context={"userAgent": UA, "campaign": {"name": "spring", "source": "news", "medium": "email"}})
    p = local_pipeline()
    catalog = p | "Catalog" >> beam.Create([{"p1": {"category": "running", "brand": "Acme", "name": "Shoe"}}])
    rates_pc = p | "Rates" >> LoadReferenceData(str(rates), rates_loader("USD"))
    out = p | beam.Create([order]) | Enrich(catalog, rates_pc)
    assert_that(out | beam.Map(lambda e: (e.revenue_reporting, e.enrichment["products"][0]["category"],
                                          e.enrichment["user_agent"]["browser"], e.enrichment["campaign"]["source"])),
                equal_to([(Decimal("13.0000"), "running", "Chrome", "news")]))
    p.run().wait_until_finish()
    assert isinstance(rates_loader("EUR")(None), Rates)
