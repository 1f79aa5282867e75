"""Packaging for cdpflow.

`pip install .` installs the package and the `cdpflow` command. The same file is what
Dataflow workers install when a job is submitted with `--setup_file ./setup.py`.
"""
import setuptools

# One Beam version everywhere (Python SDK, Prism, Java jars). 2.73.0 is the newest release for
# which the Python SDK (PyPI), Prism (`go install ...@v2.73.0`) and Beam's Java artifacts used by
# the expansion service (beam-sdks-java-expansion-service, beam-sdks-java-io-kafka,
# beam-model-pipeline) all resolve from the registries we build from; 2.74/2.75 lack
# beam-model-pipeline and the expansion service there, 2.76 lacks the Java core, and 2.77's Java
# side is not served at all. See docs/versions.md for what was probed.
BEAM_VERSION = "2.73.0"

INSTALL_REQUIRES = [
    f"apache-beam=={BEAM_VERSION}",
    "duckdb==1.5.5",
    "fastjsonschema>=2.20,<3",
    "fastapi>=0.110",  # the collector's HTTP API and the profile API (with uvicorn)
    "google-cloud-bigquery>=3.20,<4",  # the BigQuery warehouse backend (the official client)
    # Beam's FileSystems for gs:// paths (a model registry on Cloud Storage); without it Beam also
    # warns "Failed to import GCSFileSystem" on every command.
    "google-cloud-storage>=2.14,<3",
    "kafka-python>=3.0.12,<4",  # `cdpflow stack`'s broker check and topics; the collector's producer
    "orjson>=3.10,<4",
    "phonenumbers>=8.13,<10",
    "plotly>=5.20",  # `cdpflow report segments`: one self-contained page (plotly.js embedded)
    "prometheus-client>=0.20",  # the collector's /metrics
    "pyarrow>=14",
    "PyYAML>=6,<7",
    "redis>=5",  # the Redis client: `cdpflow stack`'s health check, and the Redis identity store
    "rich>=13,<16",
    "scikit-learn>=1.4",  # the customer clusters (`cdpflow train`), scored with RunInference's handler too
    "joblib>=1.3",  # the stored scikit-learn Pipeline
    "scipy>=1.11",
    "ua-parser>=1.0,<2",
    "ua-parser-builtins",
    "uvicorn>=0.29",
]

EXTRAS_REQUIRE = {
    "gcp": [f"apache-beam[gcp]=={BEAM_VERSION}", "google-cloud-bigquery>=3.20,<4"],
    "kafka": [],  # kafka-python is in the base install now; the extra stays so `.[kafka]` still resolves
    "serve": [],  # in the base install now (the collector); the extra stays so `.[serve]` still resolves
    "ml": [],  # scikit-learn and joblib are in the base install now; the extra stays so `.[ml]` still resolves
    # pandas: the features test oracle; segment-analytics-python: a real SDK for the collector tests;
    # schemathesis: the profile API against its OpenAPI document; httpx2: Starlette's test client;
    # aiohttp: the API benchmark's open-loop load generator (a faster client than httpx's)
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "schemathesis>=4.30", "httpx2>=2", "hypothesis>=6.100", "pandas>=2.2",
            "segment-analytics-python>=2.3", "requests>=2.31", "aiohttp>=3.9"],
}

# The JSON Schemas sit in data-only folders, one per event kind (cdpflow/schemas/events/<kind>/),
# which Python can import as namespace packages. find_packages left those folders out of
# `packages`: setuptools still shipped their files, but with a deprecation warning per folder
# ("Package would be ignored"). Found as namespace packages, each folder's schemas are its own
# package data (tests/deploy checks that an installed copy has every one).
PACKAGES = setuptools.find_namespace_packages(include=["cdpflow", "cdpflow.*"], exclude=["*.__pycache__"])
PACKAGE_DATA = {
    "cdpflow.config": ["*.yaml"],
    **{package: ["*.json"] for package in PACKAGES if package.startswith("cdpflow.schemas.events.")},
}

setuptools.setup(
    name="cdpflow",
    version="0.1.0",
    description="Real-time customer data platform pipeline on Apache Beam",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10,<3.13",
    packages=PACKAGES,
    package_data=PACKAGE_DATA,
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["cdpflow=cdpflow.cli:main"]},
)
