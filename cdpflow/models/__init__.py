"""Models: predictive customer-value models now; the registry and clustering come next.

`clv`: BG/NBD (expected purchases, probability alive) and Gamma-Gamma (expected spend), fitted
by maximum likelihood and checked against the published CDNOW fit. Applying them to profiles,
the model registry and scikit-learn segments with RunInference are the next milestones.
"""
