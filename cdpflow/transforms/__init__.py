"""Composite PTransforms of the cdpflow pipeline, one concern a module.

Each stage wires plain-Python logic from `cdpflow.core` into Beam, counts what it received,
what succeeded and what went to dead letters (Beam metrics namespaced by the DoFn's class), and
sends every record it refuses to the `dead_letters` output.
"""
DEAD_LETTERS = "dead_letters"
