"""Reading occlusion method specs: ``occlusion[:SIZE[/STRIDE]][:FILL]``, ``occlusion-adaptive[:BUDGET][:SIZE[/STRIDE]][:FILL]``.

A length is voxels (``16``), millimetres (``20mm``, ``7.5mm``), or one per axis (``16x16x8``,
``20x20x30mm``). The stride defaults to half the occluder. ``FILL`` is what replaces the occluded
voxels: ``zero`` (default), ``mean`` (the input's mean, per channel) or ``blur`` (the input blurred
at the occluder's scale).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from ...errors import InputError

FILLS = ("zero", "mean", "blur")
_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)(?:x(\d+(?:\.\d+)?)x(\d+(?:\.\d+)?))?(mm|vox)?$")


@dataclass(frozen=True)
class Lengths:
    """Three lengths along the model grid's axes, in voxels or mm (``unit``)."""

    values: tuple[float, float, float]
    unit: str = "vox"  # "vox" or "mm"

    def voxels(self, spacing_mm: Sequence[float] | None, what: str = "occluder") -> tuple[int, int, int]:
        """In whole voxels (at least 1) on a grid of ``spacing_mm``; mm lengths need the spacing."""
        if self.unit == "vox":
            return tuple(max(1, math.floor(v + 0.5)) for v in self.values)
        if spacing_mm is None:
            raise InputError(f"an {what} given in mm needs the model grid's voxel spacing; run it through explain() or give voxels")
        return tuple(max(1, math.floor(v / s + 0.5)) for v, s in zip(self.values, spacing_mm))

    def half(self) -> "Lengths":
        return Lengths(tuple(v / 2 for v in self.values), self.unit)

    def text(self) -> str:
        numbers = [f"{v:g}" for v in self.values]
        body = numbers[0] if len(set(numbers)) == 1 else "x".join(numbers)
        return body + ("mm" if self.unit == "mm" else "")


def parse_lengths(text: str, spec: str, usage: str) -> Lengths:
    match = _LENGTH.match(text.strip().lower())
    if not match:
        raise InputError(f"{spec}: cannot read {text!r} as a length; {usage}")
    first, second, third, unit = match.groups()
    values = (float(first), float(second or first), float(third or first))
    if min(values) <= 0:
        raise InputError(f"{spec}: lengths must be > 0 (got {text!r}); {usage}")
    if unit != "mm" and any(v != int(v) for v in values):
        raise InputError(f"{spec}: a length in voxels must be a whole number (got {text!r}); add mm for millimetres")
    return Lengths(values, "mm" if unit == "mm" else "vox")


@dataclass(frozen=True)
class OccluderOptions:
    """Occluder size and stride (stride None: half the size) and the fill."""

    size: Lengths
    stride: Lengths | None = None
    fill: str = "zero"

    @property
    def effective_stride(self) -> Lengths:
        return self.stride or self.size.half()

    def voxels(self, spacing_mm: Sequence[float] | None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(size, stride) in voxels; the stride is at least 1 voxel and at most the size."""
        size = self.size.voxels(spacing_mm)
        stride = self.effective_stride.voxels(spacing_mm, "occluder stride")
        return size, tuple(min(s, n) for s, n in zip(stride, size))

    def text(self) -> str:
        text = self.size.text() + (f"/{self.stride.text()}" if self.stride else "")
        return text + (f":{self.fill}" if self.fill != "zero" else "")


def parse_size_field(field: str, spec: str, usage: str) -> tuple[Lengths, Lengths | None]:
    size_text, slash, stride_text = field.partition("/")
    size = parse_lengths(size_text, spec, usage)
    stride = parse_lengths(stride_text, spec, usage) if slash else None
    if stride is not None and stride.unit == size.unit and any(s > n for s, n in zip(stride.values, size.values)):
        raise InputError(f"{spec}: a stride larger than the occluder leaves voxels never occluded; use STRIDE ≤ SIZE")
    return size, stride


def parse_fields(fields: list[str], default_size: Lengths, spec: str, usage: str) -> OccluderOptions:
    """Fields ``SIZE[/STRIDE]`` and ``FILL``, in any order, each at most once."""
    size, stride, fill = None, None, None
    for field in fields:
        if not field:
            raise InputError(f"{spec}: empty field; {usage}")
        if field in FILLS:
            if fill is not None:
                raise InputError(f"{spec}: two fills given; {usage}")
            fill = field
        elif field[0].isdigit():
            if size is not None:
                raise InputError(f"{spec}: two sizes given; {usage}")
            size, stride = parse_size_field(field, spec, usage)
        else:
            raise InputError(f"{spec}: unknown field {field!r}; {usage}")
    return OccluderOptions(size or default_size, stride, fill or "zero")


def split_fields(option: str | None) -> list[str]:
    return [f.strip().lower() for f in option.split(":")] if option else []


def parse_occlusion(option: str | None, default_size: Lengths, name: str = "occlusion") -> OccluderOptions:
    """``SIZE[/STRIDE][:FILL]`` → :class:`OccluderOptions`."""
    usage = f"use {name}:SIZE[/STRIDE][:FILL], e.g. {name}:16/8 or {name}:20mm/10mm:blur (FILL: {', '.join(FILLS)})"
    return parse_fields(split_fields(option), default_size, f"{name}:{option}", usage)


def parse_adaptive(option: str | None, default_size: Lengths, name: str) -> tuple[int | None, OccluderOptions]:
    """``[BUDGET][:SIZE[/STRIDE]][:FILL]`` → (budget of forward passes or None, finest occluder).

    The budget is a bare whole number and comes first; a size after it is the finest occluder.
    """
    usage = (f"use {name}:BUDGET[:SIZE[/STRIDE]][:FILL], e.g. {name}:400 or {name}:400:8/4:blur "
             "(BUDGET: forward passes; SIZE: the finest occluder)")
    spec = f"{name}:{option}"
    fields = split_fields(option)
    budget = None
    if fields and fields[0].isdigit():
        budget = int(fields.pop(0))
        if budget < 1:
            raise InputError(f"{spec}: the budget must be at least 1 forward pass; {usage}")
    elif fields and re.fullmatch(r"\d*\.\d+|\d+\.\d*", fields[0]):
        raise InputError(f"{spec}: the budget is a whole number of forward passes; {usage}")
    return budget, parse_fields(fields, default_size, spec, usage)
