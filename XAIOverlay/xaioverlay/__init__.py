"""XAIOverlay engine: explanations for 3D imaging models, with no Slicer import.

Public entry points:

- :func:`xaioverlay.volumes.read_volume` / :func:`xaioverlay.volumes.write_volume`
- :func:`xaioverlay.models.load_model`
- :func:`xaioverlay.targets.parse_target`
- :func:`xaioverlay.explain.explain`
"""

__version__ = "0.1.0"
