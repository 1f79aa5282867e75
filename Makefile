# cdpflow: `make run` (the demo on the embedded default) and `make test` (the whole suite).
# Both set up .venv on first use; nothing else needs to be installed by hand.
# `make stack` / `make stack-down` start and stop the local services (`cdpflow stack`).

PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
# Go builds Prism; look beside the usual install place too when it is not on PATH.
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
VENV := .venv
BIN := $(VENV)/bin
BEAM_VERSION := 2.73.0
SAMPLE ?= out/sample
WAREHOUSE ?= out/cdp.duckdb
CUSTOMERS ?= 2000
DAYS ?= 180
SEED ?= 7
# apt-get needs root; a developer who is not root gets sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

KAFKA_LIBS := .cache/kafka/libs
# Flink runs cdpflow's own PyFlink job from a venv of its own (PyFlink pins an older Beam).
FLINK_VENV := .cache/flink-venv
FLINK_JARS := .cache/flink/jars
# The BigQuery emulator runs in a venv of its own (it needs Python 3.13); DuckDB, under it, finds
# its extensions in a home folder of their own (.cache/bigquery-home).
# (a python3.13 that runs; else pyenv's 3.13 when pyenv has one installed but another selected)
PY313 ?= $(shell python3.13 -c 'import sys; print(sys.executable)' 2>/dev/null || \
	{ command -v pyenv >/dev/null && PYENV_VERSION=$$(pyenv versions --bare | grep '^3\.13' | tail -1) \
	  pyenv which python3.13; } 2>/dev/null)
BQ_VENV := .cache/bigquery-venv
BQ_HOME := .cache/bigquery-home

.PHONY: venv run test test-fast bench prism redis-server chromium java mvn kafka flink bigquery-emulator stack stack-down clean

# The editable install runs without setuptools' warning that the package's folder may shadow the
# package (it is that folder): a first `make run` prints only what cdpflow says.
$(VENV)/.installed: setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Only for its data: the CDNOW files the CLV tests reproduce the published fit on.
	$(BIN)/pip install --quiet --no-deps lifetimes==0.11.3
	touch $@

venv: $(VENV)/.installed

# Generate a sample (>= 50,000 events), run the batch pipeline on the local runner, print the summary.
run: venv
	rm -f $(WAREHOUSE) $(basename $(WAREHOUSE)).segment_changes.jsonl $(basename $(WAREHOUSE)).identity.sqlite
	$(BIN)/cdpflow generate --customers $(CUSTOMERS) --days $(DAYS) --seed $(SEED) --out $(SAMPLE)
	CDPFLOW_DEMO=1 $(BIN)/cdpflow run --input $(SAMPLE)/events --catalog $(SAMPLE)/catalog.csv --rates $(SAMPLE)/rates.csv \
		--warehouse $(WAREHOUSE)
	@echo
	@echo "Serve these profiles over the profile API (the embedded demo: no Redis, no Kafka):"
	@echo "  CDPFLOW_DEMO=1 $(BIN)/cdpflow serve api --warehouse $(WAREHOUSE)"
	@echo "and in another terminal (the demo's API key is kept in $(basename $(WAREHOUSE)).api.key):"
	@echo "  curl -s -H \"Authorization: Bearer \$$(cat $(basename $(WAREHOUSE)).api.key)\" http://127.0.0.1:8090/v1/segments"

test: venv prism redis-server kafka flink chromium bigquery-emulator
	$(BIN)/python -m pytest tests

test-fast: venv prism redis-server kafka flink chromium bigquery-emulator
	$(BIN)/python -m pytest -m "not e2e" tests

bench: venv prism redis-server kafka flink bigquery-emulator
	$(BIN)/python benchmarks/pipeline_vs_reference.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/identity_store.py
	$(BIN)/python benchmarks/collector.py
	$(BIN)/python benchmarks/live.py --rates 10 25 50 --seconds 30
	$(BIN)/python benchmarks/flink.py
	$(BIN)/python benchmarks/sidecar.py
	$(BIN)/python benchmarks/api.py
	$(BIN)/python benchmarks/live.py --engine flink --rates 25 50 100 200 400 --seconds 20
	$(BIN)/python benchmarks/segmentation.py
	$(BIN)/python benchmarks/bigquery.py --micro-batch 5000

# Prism, Beam's portable local runner, built from the Go module proxy (used by --runner prism).
prism: .cache/bin/prism
.cache/bin/prism:
	mkdir -p .cache/bin
	GOBIN=$(CURDIR)/.cache/bin $(GO) install github.com/apache/beam/sdks/v2/go/cmd/prism@v$(BEAM_VERSION)

# Redis for the stack and the tests, from Debian's packages; installed once, when missing.
redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y --no-install-recommends redis-server; }

# Debian's Chromium: the tests open the segments report in it, headless. With its recommended
# packages (fonts among them), as it was installed where the report test was written.
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# Java and Maven from Debian's packages, for the Kafka broker; installed once, when missing.
java:
	@command -v java >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y --no-install-recommends openjdk-17-jre-headless; }

mvn:
	@command -v mvn >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y --no-install-recommends maven; }

# The Kafka broker's runtime jars from Maven Central (no Kafka in Debian), fetched once: the stamp
# is written only after every jar has been copied, so an interrupted fetch is done again.
kafka: java $(KAFKA_LIBS)/.fetched
$(KAFKA_LIBS)/.fetched: cdpflow/stack/kafka-pom.xml | mvn
	rm -rf $(KAFKA_LIBS)
	mvn -B -q -f cdpflow/stack/kafka-pom.xml dependency:copy-dependencies -DincludeScope=runtime \
		-DoutputDirectory=$(CURDIR)/$(KAFKA_LIBS)
	touch $@

# Flink: the session cluster's files come from PyPI's apache-flink (bin/, conf/) and
# apache-flink-libraries (lib/, opt/, plugins/), installed into the job's own venv with cdpflow
# (--no-deps: the core needs no Beam), built once; the Kafka connector jar from Maven Central.
flink: java $(FLINK_VENV)/.installed $(FLINK_JARS)/.fetched
$(FLINK_VENV)/.installed: deploy/flink/requirements.txt setup.py
	rm -rf $(FLINK_VENV)
	$(PY) -m venv $(FLINK_VENV)
	$(FLINK_VENV)/bin/pip install --quiet --upgrade pip
	$(FLINK_VENV)/bin/pip install --quiet -r deploy/flink/requirements.txt
	$(FLINK_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

$(FLINK_JARS)/.fetched: cdpflow/stack/flink-pom.xml | mvn
	rm -rf $(FLINK_JARS)
	mvn -B -q -f cdpflow/stack/flink-pom.xml dependency:copy-dependencies -DincludeScope=runtime \
		-DexcludeTransitive=true -DoutputDirectory=$(CURDIR)/$(FLINK_JARS)
	touch $@

# The BigQuery emulator (PyPI's local-bigquery) in its own Python 3.13 venv, with DuckDB 1.5.5 and
# the extension files it loads (icu, ducklake, spatial) copied from their PyPI wheels into its
# home, so nothing is downloaded when it runs (deploy/bigquery/requirements.txt says why).
bigquery-emulator: $(BQ_VENV)/.installed
$(BQ_VENV)/.installed: deploy/bigquery/requirements.txt
	@test -n "$(PY313)" || { echo "the BigQuery emulator needs Python 3.13 (python3.13 on PATH, or make PY313=...)"; exit 1; }
	rm -rf $(BQ_VENV) $(BQ_HOME)
	$(PY313) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/pip install --quiet --upgrade pip
	$(BQ_VENV)/bin/pip install --quiet -r deploy/bigquery/requirements.txt
	$(BQ_VENV)/bin/pip install --quiet --no-deps local-bigquery==0.4.0
	mkdir -p $(BQ_HOME)/.duckdb/extensions/v1.5.5/linux_amd64
	cp $(BQ_VENV)/lib/python3.13/site-packages/duckdb_extension_*/extensions/v1.5.5/*.duckdb_extension \
		$(BQ_HOME)/.duckdb/extensions/v1.5.5/linux_amd64/
	touch $@

# The local services on 127.0.0.1 (default set: redis, kafka), data under .stack/; see README "Local services".
stack: venv redis-server kafka flink bigquery-emulator
	$(BIN)/cdpflow stack up

stack-down: venv
	$(BIN)/cdpflow stack down

clean:
	rm -rf out .pytest_cache build dist *.egg-info
