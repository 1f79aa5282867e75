"""Synthetic, deterministic customer-event data with ground truth.

See :mod:`cdpflow.synthetic.generator` for what is generated and why.
"""

from cdpflow.synthetic.generator import NoiseRates, generate

__all__ = ["NoiseRates", "generate"]
