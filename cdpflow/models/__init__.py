"""Models: training, the model registry, segment naming and predictive (CLV) models.

Nothing ships here yet: rule and lifecycle segments live in `cdpflow.core.segments` and
`cdpflow.core.features`; scikit-learn clustering with a registry and RunInference is planned
next on the roadmap (see README).
"""
