"""The one object every model format loads into: :class:`LoadedModel`."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import InputError, ModelError, TargetError
from ..volumes import Geometry, Volume

log = logging.getLogger(__name__)

CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
ACTIVATIONS = ("softmax", "sigmoid", "none")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when PyTorch sees a GPU, else CPU; ``cpu``; ``cuda`` or ``cuda:N``."""
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"--device {text} asked for, but PyTorch {torch.__version__} sees no CUDA GPU; "
                "use --device cpu (or auto), or install a CUDA build of PyTorch"
            )
        return torch.device(text)
    if text == "cpu":
        return torch.device("cpu")
    raise ModelError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_mapping(path: Path, load: Callable[[str], object], errors: tuple[type[Exception], ...], kind: str,
                 not_a_mapping: str) -> dict:
    """``load`` of the text of ``path``; a one-line ModelError when it is not valid ``kind`` or not a mapping."""
    try:
        content = load(path.read_text(encoding="utf-8"))
    except (*errors, UnicodeDecodeError) as error:
        first_line = next(iter(str(error).splitlines()), "")
        raise ModelError(f"{path}: not valid {kind} ({first_line[:160]})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{path}: {not_a_mapping}")
    return content


@dataclass
class ModelInput:
    """A preprocessed input, ready for the network.

    Attributes:
        tensor: (1, C, X, Y, Z) float32 on the model's device: what the network sees.
        ijk_to_ras: 4×4 voxel → RAS mm affine of the model grid (after the model's own reorienting,
            resampling and cropping).
        reference: grid of the first input volume; every map is returned on it.
        volumes: the input volumes as read (unchanged).
    """

    tensor: torch.Tensor
    ijk_to_ras: np.ndarray
    reference: Geometry
    volumes: list[Volume]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.tensor.shape[2:])

    @property
    def model_geometry(self) -> Geometry:
        return Geometry.from_ijk_to_ras(self.ijk_to_ras, self.spatial_shape)


@dataclass
class PassCounter:
    """Forward and backward passes, counted per input (a batch of 8 counts 8)."""

    forward: int = 0
    backward: int = 0

    def reset(self) -> None:
        self.forward = self.backward = 0

    def as_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward}


@dataclass
class SlidingWindow:
    """A sliding-window inferer, in the terms MONAI's ``SlidingWindowInferer`` uses.

    ``layout``: ``"monai"`` (MONAI's tile placement and importance map) or ``"nnunet"`` (nnU-Net's; see
    :mod:`xaioverlay.sliding`).
    """

    roi_size: tuple[int, int, int]
    overlap: float = 0.25
    mode: str = "constant"
    sigma_scale: float = 0.125
    sw_batch_size: int = 1
    layout: str = "monai"

    def needed(self, spatial_shape: Sequence[int]) -> bool:
        """True when the volume is larger than the window along some axis (nnU-Net: always)."""
        return self.layout == "nnunet" or any(s > r for s, r in zip(spatial_shape, self.roi_size))


@dataclass
class LoadedModel:
    """A network ready to explain, whatever format it came from.

    Attributes:
        network: the ``nn.Module`` (or TorchScript module) on ``device``, in eval mode.
        task: ``"classification"`` (output (B, K)) or ``"segmentation"`` (output (B, K, X, Y, Z)).
        class_names: one name per output channel.
        in_channels: number of input volumes the network expects.
        channel_names: their names, in order, when the format declares them.
        activation: ``"softmax"``, ``"sigmoid"`` or ``"none"``, applied to logits for probabilities.
        transforms: the model's own preprocessing, applied to ``{image_key: MetaTensor}``.
        sliding_window: set when the model is run window by window on large volumes.
        internals_available: False for TorchScript: methods that hook layers are refused.
        example_shape: an input spatial shape for probing layers when no volume is given.
    """

    network: torch.nn.Module
    device: torch.device
    task: str
    class_names: list[str]
    in_channels: int
    activation: str = "none"
    channel_names: list[str] = field(default_factory=list)
    transforms: Callable | None = None
    image_key: str = "image"
    sliding_window: SlidingWindow | None = None
    internals_available: bool = True
    example_shape: tuple[int, int, int] = (64, 64, 64)
    source: Path = Path(".")
    format: str = ""
    model_id: str = ""
    amp: bool = False
    passes: PassCounter = field(default_factory=PassCounter)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ModelError(f"{self.source}: unknown output activation {self.activation!r}; use one of {ACTIVATIONS}")
        if self.task not in (CLASSIFICATION, SEGMENTATION):
            raise ModelError(f"{self.source}: unknown task {self.task!r}; use classification or segmentation")
        self.network.eval()

    # --- running ---------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision when asked for and running on CUDA; a no-op otherwise."""
        if self.amp and self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw network output (logits) for a batch; every method runs the network through here.

        Args:
            x: (B, C, X, Y, Z) on ``device``.
        Returns:
            (B, K) for classifiers, (B, K, X, Y, Z) for segmenters, float32.
        """
        with self.autocast():
            out = self.network(x)
        if isinstance(out, (tuple, list)):  # deep-supervision heads: the first is the prediction
            out = out[0]
        out = out.float()
        batch = int(x.shape[0])
        self.passes.forward += batch
        if out.requires_grad:
            def count_backward(grad: torch.Tensor) -> None:
                self.passes.backward += batch
            out.register_hook(count_backward)
        return out

    def output_blocks(self, x: torch.Tensor, on_window: Callable[[int, int], None] = lambda done, total: None):
        """The whole-volume output as the model's own inferer computes it, block by block (no gradients).

        Yields (slices of the (X, Y, Z) grid, (B, K, *block) output); a model without a sliding window,
        or a volume no larger than one window (nnU-Net's layout: always tiled), gives one block: the whole
        output. See :func:`xaioverlay.sliding.blended_blocks`: no block outlives the caller's use of it.
        """
        from .. import sliding

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            # inference mode around each pass only: a mode entered in a generator would leak into the
            # caller's code between blocks (and be restored out of order)
            with torch.inference_mode():
                return self.forward(inputs)

        if self.task != CLASSIFICATION and self.sliding_window is not None and self.sliding_window.needed(x.shape[2:]):
            yield from sliding.blended_blocks(self.sliding_window, x, forward, on_window)
        else:
            yield (slice(None),) * 3, forward(x)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-volume output as the model's own inferer computes it (no gradients): (B, K) or (B, K, X, Y, Z).

        A segmenter's whole output holds every channel at every voxel; the engine's own paths use
        :meth:`output_blocks` (or :func:`xaioverlay.prediction.predict`) instead."""
        from ..sliding import assemble

        return assemble(self.output_blocks(x), x.shape[2:])

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the output activation along the channel axis (dim 1)."""
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return logits

    # --- inputs ----------------------------------------------------------------------------
    def preprocess(self, volumes: Sequence[Volume]) -> ModelInput:
        """Stack the input volumes as channels and run the model's own preprocessing.

        The volumes are not modified. Channels are in the order given.
        """
        if len(volumes) != self.in_channels:
            names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
            raise InputError(
                f"the model expects {self.in_channels} input channel(s){names} but got {len(volumes)} volume(s); "
                f"pass {self.in_channels} co-registered volume(s) with --input, in the model's channel order"
            )
        from monai.data import MetaTensor

        reference = volumes[0].geometry
        array = np.stack([np.asarray(v.array, dtype=np.float32) for v in volumes])
        image = MetaTensor(
            torch.from_numpy(array),
            affine=torch.as_tensor(reference.ijk_to_ras(), dtype=torch.float64),
            meta={"filename_or_obj": volumes[0].name, "original_channel_dim": 0},
        )
        if self.transforms is not None:
            try:
                image = self.transforms({self.image_key: image})[self.image_key]
            except Exception as error:  # MONAI wraps transform errors; show the root cause
                root = error
                while root.__cause__ is not None:
                    root = root.__cause__
                raise InputError(f"the model's preprocessing failed on this input: {str(root).splitlines()[0][:200]}") from None
        affine = image.affine if isinstance(image, MetaTensor) else torch.as_tensor(reference.ijk_to_ras())
        tensor = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        tensor = tensor.to(self.device, torch.float32)[None]
        if tensor.ndim != 5:
            raise ModelError(f"{self.source}: preprocessing produced shape {tuple(tensor.shape[1:])}, expected (C, X, Y, Z)")
        return ModelInput(tensor, np.asarray(affine, dtype=float).reshape(4, 4), reference, list(volumes))

    def example_input(self) -> torch.Tensor:
        """A zero input of :attr:`example_shape` for probing layers without a volume."""
        return torch.zeros((1, self.in_channels, *self.example_shape), device=self.device)

    # --- names -----------------------------------------------------------------------------
    def class_index(self, key: str | int) -> int:
        """Resolve a class/channel given as an index or a (case-insensitive) name."""
        text = str(key).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(self.class_names):
                raise TargetError(
                    f"class/channel {index} out of range; this model has {len(self.class_names)}: "
                    + ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
                )
            return index
        lowered = [name.lower() for name in self.class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        import difflib

        close = difflib.get_close_matches(text.lower(), lowered, n=3)
        hint = f"did you mean {', '.join(repr(self.class_names[lowered.index(c)]) for c in close)}? " if close else ""
        raise TargetError(
            f"unknown class {text!r}; {hint}this model's classes: "
            + ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names))
        )

    def describe(self) -> dict:
        """Model facts recorded with every explanation."""
        return {
            "id": self.model_id,
            "source": str(self.source),
            "format": self.format,
            "task": self.task,
            "class_names": list(self.class_names),
            "in_channels": self.in_channels,
            **({"channel_names": list(self.channel_names)} if self.channel_names else {}),
            "activation": self.activation,
            "device": str(self.device),
            "mixed_precision": bool(self.amp and self.device.type == "cuda"),
            "sliding_window": None if self.sliding_window is None else {
                "roi_size": list(self.sliding_window.roi_size), "overlap": self.sliding_window.overlap,
                "mode": self.sliding_window.mode, "layout": self.sliding_window.layout,
            },
        }
