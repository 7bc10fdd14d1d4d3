"""``xaioverlay demo``: a phantom, both demo models, every method, outputs on disk."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .explain import explain
from .methods import REGISTRY
from .models import LoadedModel, load_model
from .outputs import prepare_output_folder, write_outputs
from .progress import NO_PROGRESS, Progress
from .volumes import write_volume

CLASSIFIER = "tumour_classifier"
SEGMENTER = "tumour_segmenter"
#: Tumour segmenters with attention (trained by tools/train_attention_models.py; not part of the demo run).
ATTENTION_UNET = "tumour_attention_unet"
SWIN_UNETR = "tumour_swin_unetr"
#: The held-out phantom the demo explains.
DEMO_SEED = 100_000


def bundles_root() -> Path:
    """Folder holding the demo bundles: ``$XAIOVERLAY_BUNDLES``, else ``Resources/bundles`` of the source tree."""
    if os.environ.get("XAIOVERLAY_BUNDLES"):
        return Path(os.environ["XAIOVERLAY_BUNDLES"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "Resources" / "bundles"
        if (candidate / CLASSIFIER).is_dir():
            return candidate
    raise InputError("demo bundles not found; set XAIOVERLAY_BUNDLES to the folder holding tumour_classifier/ and tumour_segmenter/")


def bundle_path(name: str) -> Path:
    return bundles_root() / name


def demo_methods(model: LoadedModel) -> list[str]:
    """Every registered method the model allows and that has a demo setting short enough (``in_demo``)."""
    return [
        getattr(cls, "demo_spec", cls.name)
        for cls in REGISTRY.values()
        if getattr(cls, "in_demo", True) and cls.unavailable(model) is None
    ]


def run_demo(out: str | os.PathLike = "xaioverlay-demo", device: str = "auto", progress: Progress = NO_PROGRESS) -> dict[str, Path]:
    """Make a held-out phantom, explain it with both demo models, write everything below ``out``."""
    from .phantoms import make_phantom

    out = prepare_output_folder(out)
    phantom = make_phantom(DEMO_SEED)
    inputs = out / "inputs"
    inputs.mkdir(exist_ok=True)
    image = write_volume(phantom.image, inputs / "phantom_t1c.nrrd")
    write_volume(phantom.tumour_mask, inputs / "tumour_mask.nrrd")
    write_volume(phantom.brain_mask, inputs / "brain_mask.nrrd")  # for `xaioverlay evaluate --body-mask`
    places = {"inputs": inputs}
    for role, name, target in (("classifier", CLASSIFIER, "class:tumour"), ("segmenter", SEGMENTER, "channel:tumour")):
        progress.message(f"{role}: {name}", stage="model")
        model = load_model(bundle_path(name), device=device)
        explanation = explain(model, [phantom.image], demo_methods(model), target, progress=progress.child(model=role))
        write_outputs(explanation, out / role)
        places[role] = out / role
    places["image"] = image
    return places
