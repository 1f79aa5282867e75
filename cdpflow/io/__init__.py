"""Beam I/O cdpflow brings for what Beam serves only through Java here (the Kafka source)."""
