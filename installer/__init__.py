"""Hardware probe, fit estimator, deployment renderers and offline bundles (see issue 3)."""
