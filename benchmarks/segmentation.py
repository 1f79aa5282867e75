"""Benchmark: customer clusters against the generator's personas, their stability, and how fast they score.

    .venv/bin/python benchmarks/segmentation.py [--customers 1500] [--days 365] [--seeds 61 62]

For each seed: generates a sample, runs the batch pipeline, and reads the truth (each profile's
persona: the person most of its identifiers belong to, from the generator's truth files). Reports:
- adjusted Rand index of KMeans and of the Gaussian mixture against the personas, at k=6 (the
  number of personas) and at the k their criterion picks in 3..10;
- the overlap of the personas on these features: the ARI and accuracy of a supervised classifier
  (a random forest, 5-fold cross-validated) given the true personas, a ceiling for any clustering;
- label stability: the share of profiles that keep their label when the model is retrained with
  another seed on the same profiles plus 10% new customers (warm start and hysteresis, as
  `cdpflow train` and every path do);
- scoring: batched assignments per second (the portable model, batches of 1,024, as the runs and
  streams score; from ready feature vectors, and from profile rows with the features read off
  them) and one profile at a time (p50/p99), and `POST /v1/classify` through
  `cdpflow serve api` over the warehouse (sequential, p50/p99);
- the stream's assignment stage on Prism in streaming mode (RunInference with the promoted
  Pipeline, batches of up to 500, then the keyed membership stage), rows per second with and
  without clusters, 30,000 rows (pipeline start included).
Results go to benchmarks/results/segmentation.json.
"""
from __future__ import annotations

import argparse
import collections
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.cli import main as cdpflow  # noqa: E402
from cdpflow.core.clusters import FEATURES, feature_vector  # noqa: E402
from cdpflow.models.segmentation import describe, fit  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402
from cdpflow.warehouse import open_warehouse  # noqa: E402


def sample(folder: Path, seed: int, customers: int, days: int):
    out = folder / f"s{seed}"
    generate(out, customers=customers, days=days, seed=seed)
    warehouse = folder / f"w{seed}.duckdb"
    assert cdpflow(["run", "--input", str(out / "events"), "--warehouse", str(warehouse), "--catalog",
                    str(out / "catalog.csv"), "--rates", str(out / "rates.csv")]) == 0
    persona = {r["person_id"]: r["persona"] for r in csv.DictReader(open(out / "truth" / "persons.csv"))}
    owner = {(r["identifier_type"], r["identifier_value"]): r["person_id"]
             for r in csv.DictReader(open(out / "truth" / "identities.csv"))}
    with open_warehouse(str(warehouse), read_only=True) as wh:
        rows, links = wh.profiles(), wh.identity_links()
    votes = collections.defaultdict(collections.Counter)
    for link in links:
        person = owner.get((link["identifier_type"], link["identifier_value"]))
        if person:
            votes[link["profile_id"]][person] += 1
    kept = [r for r in rows if r["profile_id"] in votes]
    truth = [persona[votes[r["profile_id"]].most_common(1)[0][0]] for r in kept]
    return warehouse, np.array([feature_vector(r) for r in kept]), np.array(truth), rows


def quality(x, truth, seed):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import adjusted_rand_score
    from sklearn.model_selection import cross_val_predict
    out = {}
    for algorithm in ("kmeans", "gmm"):
        for k_range in ((6, 6), (3, 10)):
            fitted = fit(x, algorithm, k_range, seed=0)
            out[f"{algorithm}_k{k_range[0]}-{k_range[1]}"] = {
                "k": fitted.k, "ari": round(adjusted_rand_score(truth, fitted.pipeline.predict(x)), 3)}
    predicted = cross_val_predict(RandomForestClassifier(300, random_state=seed), x, truth, cv=5)
    out["supervised_ceiling"] = {"ari": round(adjusted_rand_score(truth, predicted), 3),
                                 "accuracy": round(float((predicted == truth).mean()), 3)}
    return out


def stability(x, extra):
    out = {}
    for algorithm in ("kmeans", "gmm"):
        first = describe(fit(x, algorithm, (6, 6), seed=1), "v1", FEATURES)
        second = describe(fit(np.vstack([x, extra]), algorithm, (6, 6), seed=2, previous=first), "v2", FEATURES,
                          first)
        before = first.assign(x)
        after = second.assign(x, previous=[c.name for c, _ in before])
        out[algorithm] = round(float(np.mean([a.label == b.label for (a, _), (b, _) in zip(before, after)])), 4)
    return out


def scoring(x, rows):
    model = describe(fit(x, "kmeans", (6, 6), seed=0), "v", FEATURES)
    big = np.tile(x, (max(1, 200_000 // len(x)), 1))
    started = time.perf_counter()
    for i in range(0, len(big), 1024):
        model.best(model.scores(big[i:i + 1024]))
    batched = len(big) / (time.perf_counter() - started)
    # as a run or a stream does it: the feature vectors read from profile rows, then scored
    many = list(rows) * max(1, 30_000 // len(rows))
    started = time.perf_counter()
    for i in range(0, len(many), 1024):
        batch = many[i:i + 1024]
        model.best(model.scores([feature_vector(r) for r in batch]))
    from_rows = len(many) / (time.perf_counter() - started)
    # what the Beam stream's RunInference does per batch: the joblib Pipeline (not the arrays) over
    # up to 500 profile rows, the scores kept for the keyed stage's hysteresis
    from cdpflow.models.registry import Scorer
    fitted = fit(x, "kmeans", (6, 6), seed=0)
    scorer = Scorer(describe(fitted, "v", FEATURES), fitted.pipeline)
    started = time.perf_counter()
    for i in range(0, len(many), 500):
        batch = many[i:i + 500]
        [scorer.portable.scored(s) for s in scorer.scores(batch)]
    inference = len(many) / (time.perf_counter() - started)
    single = []
    for row in x[:2000]:
        t = time.perf_counter()
        model.choose(model.scores([row])[0])
        single.append((time.perf_counter() - t) * 1000)
    single.sort()
    return {"batched_vectors_per_second": round(batched), "batched_rows_per_second": round(from_rows),
            "run_inference_fn_rows_per_second": round(inference),
            "one_profile_p50_ms": round(statistics.median(single), 3),
            "one_profile_p99_ms": round(single[int(len(single) * 0.99) - 1], 3)}


def stream_stage(warehouse: Path, rows, total: int = 30_000):
    """The stream's assignment stage on Prism (streaming, as `cdpflow stream` runs it): profile rows
    -> RunInference with the promoted model (the registry followed) -> the keyed membership stage;
    and the same stage without clusters, so the difference is what scoring costs."""
    import apache_beam as beam

    from cdpflow.config import load_config
    from cdpflow.core.clusters import micros
    from cdpflow.runners.direct import streaming_pipeline
    from cdpflow.transforms.segments import AssignSegmentsStream
    config = load_config(None)
    registry = os.path.splitext(str(warehouse))[0] + ".models"  # trained by classify_over_http
    many = []
    for i in range(total):
        row = rows[i % len(rows)]
        many.append(dict(row, profile_id=f"{row['profile_id']}-{i}", as_of=micros(row["as_of"]), updated_at=1,
                         _cause_message_id="m"))
    out = {"rows": total}
    for label, registry_for_run in (("with_clusters", registry), ("without_clusters", None)):
        started = time.perf_counter()
        pipeline = streaming_pipeline("prism")
        _ = (pipeline | beam.Create(many, reshuffle=False)
             | AssignSegmentsStream(config["segments"], config["lifecycle"], registry=registry_for_run, every_s=10))
        pipeline.run().wait_until_finish()
        out[f"{label}_rows_per_second"] = round(total / (time.perf_counter() - started))
    return out


def classify_over_http(warehouse: Path, requests_n: int = 1000):
    import requests

    from cdpflow.stack.base import free_port
    env = dict(os.environ, CDPFLOW_DEMO="1")
    assert subprocess.run([sys.executable, "-m", "cdpflow.cli", "train", "--warehouse", str(warehouse), "--k", "6",
                           "--promote"], env=env, capture_output=True).returncode == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", "serve", "api", "--warehouse", str(warehouse),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
            assert time.monotonic() < deadline and server.poll() is None, "the API did not start"
        key = open(os.path.splitext(str(warehouse))[0] + ".api.key").read().strip()
        with open_warehouse(str(warehouse), read_only=True) as wh:
            ids = [r["profile_id"] for r in wh.profiles()]
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        times = []
        for i in range(requests_n):
            t = time.perf_counter()
            answer = session.post(url + "/v1/classify", json={"profile_id": ids[i % len(ids)]})
            times.append((time.perf_counter() - t) * 1000)
            assert answer.status_code == 200 and answer.json()["model_version"], answer.text
            time.sleep(0.02)  # under the demo key's 50 requests/s
        times.sort()
        return {"requests": requests_n, "p50_ms": round(statistics.median(times), 2),
                "p99_ms": round(times[int(len(times) * 0.99) - 1], 2)}
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1500)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seeds", type=int, nargs="+", default=[61, 62])
    args = parser.parse_args()
    os.environ["CDPFLOW_DEMO"] = "1"
    folder = Path(tempfile.mkdtemp(prefix="cdpflow-bench-segmentation-"))
    results = {"machine": common.machine(), "customers": args.customers, "days": args.days, "by_seed": {}}
    samples = {seed: sample(folder, seed, args.customers, args.days) for seed in args.seeds}
    for i, seed in enumerate(args.seeds):
        _, x, truth, _ = samples[seed]
        other = samples[args.seeds[(i + 1) % len(args.seeds)]][1]
        extra = other[np.random.default_rng(seed).choice(len(other), len(x) // 10, replace=False)]
        results["by_seed"][seed] = {"profiles": len(x), "quality": quality(x, truth, seed),
                                    "stability": stability(x, extra)}
        print(seed, results["by_seed"][seed], flush=True)
    warehouse, x, _, rows = samples[args.seeds[0]]
    results["scoring"] = scoring(x, rows)
    results["classify_http"] = classify_over_http(warehouse)
    results["stream_stage"] = stream_stage(warehouse, rows)
    print(results["scoring"], results["classify_http"], results["stream_stage"])
    print("saved to", common.save_results("segmentation", results))


if __name__ == "__main__":
    main()
