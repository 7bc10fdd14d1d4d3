"""What every explanation method is: one call shape, one result type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target


@dataclass
class Attribution:
    """A method's map on the model grid.

    Attributes:
        map: (X, Y, Z) float32 tensor, the model input's spatial shape.
        signed: True when negative values carry meaning (LRP, gradient×input, IG).
        parameters: everything needed to reproduce the map (layer, composite, steps, ...).
        extras: facts measured along the way (e.g. LRP's conservation error).
    """

    map: torch.Tensor
    signed: bool
    parameters: dict
    extras: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Segments:
    """A method's segments: ``ids`` (X, Y, Z) long 0..S-1 on the model grid, made from ``spec``."""

    ids: torch.Tensor
    spec: str


@dataclass(frozen=True, eq=False)
class Context:
    """What the engine gives a method besides the model, the input and the target.

    Attributes:
        spacing_mm: voxel spacing (mm per axis) of the grid the method sees (options in mm, e.g. occluder
            sizes, become voxels with it); None on a direct call without a grid.
        segments: the segments of methods that keep or fill them (:attr:`Method.uses_segments`), else None.
        window: during a window-by-window run, the current window's slices of the padded grid, else None.
        whole_volume: during that run, what :meth:`Method.begin_windows` returned for the whole volume.
    """

    spacing_mm: tuple[float, float, float] | None = None
    segments: Segments | None = None
    window: tuple[slice, ...] | None = None
    whole_volume: object | None = None


#: The context of a direct call: no spacing, no segments, no window.
NO_CONTEXT = Context()


class Method:
    """Base class: subclasses set the class attributes and implement :meth:`attribute`.

    A method is built from its CLI spec ``name[:option]`` by :meth:`from_option`; ``option`` is the
    text after the colon (None when absent).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    signed: ClassVar[bool] = False
    #: Each voxel holds a share of the explained score (LRP, gradient×input, IG): the map is moved to the
    #: input grid keeping its sum over every region; False for intensities (CAMs, occlusion), interpolated.
    additive: ClassVar[bool] = False
    #: Hooks into layers: refused for TorchScript models.
    needs_internals: ClassVar[bool] = False
    #: On sliding-window models the engine runs the method window by window and sums the maps
    #: (exact for methods linear in the target, e.g. gradients); False if the method handles windows.
    by_window: ClassVar[bool] = True
    #: One line for --help.
    summary: ClassVar[str] = ""
    #: Perturbation methods that keep or fill *segments* (see :mod:`xaioverlay.segments`) set this; the
    #: engine then gives them segments in :attr:`Context.segments`, from ``--segments`` or :attr:`default_segments`.
    uses_segments: ClassVar[bool] = False
    #: Segment spec used when the user gives none (None: no segments, e.g. occlusion keeps its boxes).
    default_segments: ClassVar[str | None] = None

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "Method":
        if option:
            from ..errors import InputError

            raise InputError(f"method {cls.name!r} takes no option (got {cls.name}:{option})")
        return cls()

    @classmethod
    def unavailable(cls, model: LoadedModel) -> str | None:
        """Why this method cannot explain ``model`` (one line for the CLI and the Slicer module), or None."""
        if cls.needs_internals and not model.internals_available:
            return (f"{cls.label} needs the network's internal layers, which a {model.format} model hides; "
                    "use a model-agnostic method (gxi, ig, occlusion) or load the model as a MONAI bundle "
                    "or state dict + spec")
        return None

    @property
    def spec(self) -> str:
        """The spec this method was built from, normalised (e.g. ``"gradcam"``)."""
        return self.name

    def prepare(self, model: LoadedModel, x: torch.Tensor) -> None:
        """Settle automatic choices (e.g. a default layer) on the whole input, before any windowing."""

    def attribute(
        self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
        context: Context = NO_CONTEXT,
    ) -> Attribution:
        """Explain ``target`` for input ``x`` (1, C, X, Y, Z) on the model's device; ``context``: what the
        engine knows beyond these (grid spacing, segments, the current sliding window)."""
        raise NotImplementedError

    def begin_windows(self, x: torch.Tensor, pads) -> object | None:
        """Called once before a window-by-window run with the whole input (1, C, X, Y, Z) and the
        padding the windows are cut from (see :func:`xaioverlay.sliding.window_padding`). Methods whose
        inputs depend on the whole volume (e.g. a mean or blurred baseline) compute them here and return
        them; each window's call then finds them in :attr:`Context.whole_volume`."""
        return None

    @classmethod
    def combine_extras(cls, extras: list[dict]) -> dict:
        """The extras of a whole volume from those of its sliding windows (default: the last window's)."""
        return extras[-1] if extras else {}


def relative_error(value: float, reference: float) -> float | None:
    """``|value − reference| / |reference|``; None when the reference is 0 (undefined)."""
    return abs(value - reference) / abs(reference) if reference else None
