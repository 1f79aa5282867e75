"""Plain-Python business logic of cdpflow: no Beam here.

Normalising identifiers and timestamps, enrichment look-ups, identity resolution, features and
segment rules are small functions and classes tested on their own; `cdpflow.transforms` wires
them into Beam.
"""
