"""Identity resolution quality on generated data with ground truth, on seeds the rules were not tuned on."""
import json

import pytest

from cdpflow.config import load_config
from cdpflow.core.evaluation import evaluate, load_truth
from cdpflow.pipelines.batch import run_batch
from cdpflow.synthetic import NoiseRates, generate
from cdpflow.warehouse import DuckDBWarehouse

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("seed, noise", [(101, 1.0), (202, 2.5)])
def test_pairwise_precision_and_recall_against_the_true_persons(tmp_path, seed, noise):
    sample = tmp_path / "sample"
    manifest = generate(sample, customers=700, days=180, seed=seed, noise=NoiseRates().scale(noise))
    warehouse = str(tmp_path / "cdp.duckdb")
    config = load_config(enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")})
    run_batch([str(sample / "events")], warehouse, config)
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        links = {(r["identifier_type"], r["identifier_value"]): r["profile_id"]
                 for r in wh.query("SELECT identifier_type, identifier_value, profile_id FROM identity_links")}
        quarantined = {r["identifier_value"] for r in wh.query("SELECT identifier_value FROM identity_links WHERE quarantined")}
    report = evaluate(links, load_truth(str(sample / "truth" / "identities.csv")))
    print(json.dumps({"seed": seed, "noise": noise, "precision": report.precision, "recall": report.recall}))
    assert report.precision >= 0.99
    assert report.recall >= 0.97
    assert report.persons == 700 and report.shared_identifiers > 0
    if manifest["noise"]["kiosk_persons"] > 4:
        assert manifest["kiosk_device_id"] in quarantined
