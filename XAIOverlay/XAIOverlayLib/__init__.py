"""Slicer-side helpers of the XAIOverlay module: they speak MRML (and never Qt), so they run in desktop
Slicer and, for the tests, against slicer-core.

- :mod:`.logic` — explain → maps in the scene → compare → next case (the module's Logic uses it)
- :mod:`.nodes` — volume nodes ⇄ NRRD files, node attributes, the subject-hierarchy folder
- :mod:`.colours` — colour tables, thresholds, legends, volume rendering of maps
- :mod:`.compare` — the compare layout, linked views, the comparison table
- :mod:`.target_spec` — the GUI's target choice → the engine's target syntax
- :mod:`.cases` — case lists (folder or scene), loading and releasing cases
- :mod:`.cache` — maps computed before, on disk
- :mod:`.worker_client` — the engine worker process
- :mod:`.dependencies` — installing PyTorch, MONAI, ... on first use
"""
