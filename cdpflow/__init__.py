"""cdpflow: a real-time customer data platform pipeline on Apache Beam.

Events in the Segment/RudderStack tracking format are validated, normalised, deduplicated,
resolved to unified customer profiles, turned into features and segments, and written to a
warehouse (DuckDB embedded, BigQuery in production). See README.md for how to run it.
"""

__version__ = "0.1.0"
