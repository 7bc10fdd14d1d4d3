"""How good is each explanation? Metrics on volumes, one module per family.

- :mod:`.faithfulness` — deletion and insertion curves and their AUC.
- :mod:`.localisation` — pointing game (mm tolerance, size-weighted), relevance mass and rank accuracy.
- :mod:`.sanity` — cascading model-parameter randomisation, random-logit check.
- :mod:`.complexity` — Gini sparseness, normalised entropy.
- :mod:`.agreement` — Spearman rank correlation between maps.
- :mod:`.evaluate` — explain and measure in one run; :mod:`.report` writes ``metrics.json``,
  ``metrics.csv`` and ``report.html``.

The metric functions are pure: tensors in, tensors out, shapes in their docstrings, batched on
whatever device the tensors are on.
"""
