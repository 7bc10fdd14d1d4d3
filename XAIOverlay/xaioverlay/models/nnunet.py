"""nnU-Net v2 trained-model folders (``Trainer__Plans__Configuration/``, TotalSegmentator's format).

The folder holds ``dataset.json`` (channel and label names), ``plans.json`` (preprocessing and network of
each configuration) and ``fold_N/checkpoint_final.pth`` (or ``checkpoint_best.pth``). The network is built
from the configuration's ``architecture`` with ``dynamic_network_architectures``, as nnU-Net builds it
(deep supervision off); only the U-Net classes and ``torch.nn`` layer types named in this module are
accepted, never an arbitrary import string from the file.

Checkpoints are read with ``torch.load(weights_only=True)`` and an allow-list of numpy's scalar and dtype
types, what nnU-Net's trainer writes besides tensors (numpy scalars in its training log); anything else in
the file is refused, so a checkpoint cannot run code. Only ``network_weights`` and the configuration name are
used.

Several folds form an ensemble whose logits are the mean of the folds' logits, as nnU-Net's predictor
averages them before its softmax/sigmoid; explanations explain that mean. The mean is linear, so gradients
and LRP pass through it unchanged: a gradient map (and LRP's relevance, which is conserved) of the ensemble
is the mean of the folds' maps. A CAM hooks one layer, which in an ensemble belongs to one fold: its map
is that fold's, scaled by 1/number of folds. Mirroring test-time augmentation (``tta``) wraps the network
in the same way: the mean over flipped copies of each patch, a linear mean again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import pickle
import re
from pathlib import Path

import torch

from ..errors import ModelError
from .base import SEGMENTATION, LoadedModel, SlidingWindow, file_digest, read_mapping
from .nnunet_preprocessing import NNUNetPreprocessing, plan_from
from .weights import apply_state_dict

log = logging.getLogger(__name__)

NAME = "nnU-Net v2 trained-model folder"
CHECKPOINTS = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
#: U-Net classes of ``dynamic_network_architectures.architectures.unet`` that may be built.
NETWORKS = ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
#: ``torch.nn`` classes that ``arch_kwargs`` may name (conv, norm, dropout, non-linearity).
LAYERS = ("Conv3d", "InstanceNorm3d", "BatchNorm3d", "GroupNorm", "Dropout3d", "Dropout", "LeakyReLU", "ReLU",
          "PReLU", "ELU", "GELU")
#: Residual blocks of ``dynamic_network_architectures.building_blocks.residual``.
BLOCKS = ("BasicBlockD", "BottleneckD")
INSTALL_HINT = ("install it without its timm/torchvision dependencies, which the U-Nets do not use: "
                "pip install --no-deps dynamic-network-architectures")


def recognise(path: Path) -> bool:
    """A folder holding ``plans.json``, ``dataset.json`` or ``fold_*`` sub-folders."""
    return path.is_dir() and (
        (path / "plans.json").is_file() or (path / "dataset.json").is_file() or any(path.glob("fold_*"))
    )


class FoldEnsemble(torch.nn.Module):
    """The folds' networks; output: the mean of their logits (nnU-Net's fold ensemble)."""

    def __init__(self, networks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.folds = torch.nn.ModuleList(networks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) → (B, K, X, Y, Z)."""
        return torch.stack([network(x) for network in self.folds]).mean(0)


class MirroredTTA(torch.nn.Module):
    """nnU-Net's mirroring test-time augmentation of one patch: the mean of ``flip(net(flip(x)))`` over no
    flip and every non-empty combination of the allowed axes (model-grid axes, 0-based)."""

    def __init__(self, network: torch.nn.Module, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.network = network
        self.flips = [()] + [tuple(a + 2 for a in c) for n in range(1, len(axes) + 1)
                             for c in itertools.combinations(axes, n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) → (B, K, X, Y, Z)."""
        outputs = [self.network(x) if not dims else self.network(x.flip(dims)).flip(dims) for dims in self.flips]
        return torch.stack(outputs).mean(0)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path.parent}: {path.name} is missing; give the nnU-Net trained-model folder "
                         "(Trainer__Plans__Configuration) that holds dataset.json, plans.json and fold_N/")
    return read_mapping(path, json.loads, (json.JSONDecodeError,), "JSON", "expected a JSON object")


# --- checkpoints ---------------------------------------------------------------------------------
def _harmless_types() -> list:
    """What an nnU-Net checkpoint holds besides tensors and builtins: numpy scalars (the trainer's log)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes]


def load_checkpoint(path: Path) -> dict:
    """``network_weights`` (name → tensor) and ``configuration`` of an nnU-Net checkpoint, read safely."""
    try:
        with torch.serialization.safe_globals(_harmless_types()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f"it holds {found.group(1)}, " if found else "it holds objects "
        raise ModelError(
            f"{path}: refused: {what}which is not one of the types an nnU-Net checkpoint needs, and loading it "
            "could run code chosen by the file's author; use checkpoints from a source you trust, saved by nnU-Net"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ModelError(f"{path}: cannot read the checkpoint ({str(error).splitlines()[0][:160]}); "
                         "the file may be truncated") from None
    weights = payload.get("network_weights") if isinstance(payload, dict) else None
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ModelError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' state dict)")
    init_args = payload.get("init_args")
    configuration = init_args.get("configuration") if isinstance(init_args, dict) else None
    axes = payload.get("inference_allowed_mirroring_axes")
    return {"network_weights": weights, "configuration": configuration if isinstance(configuration, str) else None,
            "mirror_axes": tuple(int(a) for a in axes) if isinstance(axes, (tuple, list)) else None}


# --- plans ---------------------------------------------------------------------------------------
def configuration_of(plans: dict, name: str, source: Path) -> dict:
    """The configuration ``name`` with what it ``inherits_from`` filled in."""
    configurations = plans.get("configurations") or {}
    if name not in configurations:
        raise ModelError(f"{source}: plans.json defines no configuration {name!r}; it has "
                         f"{', '.join(configurations) or 'none'} (the folder name ends with __CONFIGURATION)")
    own = dict(configurations[name])
    parent = own.pop("inherits_from", None)
    return {**configuration_of(plans, parent, source), **own} if parent else own


def _layer_class(text: str | None, source: Path):
    """A ``torch.nn`` layer class or residual block named in ``arch_kwargs``, from the allow-lists only."""
    if text is None:
        return None
    name = str(text).rsplit(".", 1)[-1]
    if str(text).startswith("torch.nn.") and name in LAYERS:
        return getattr(torch.nn, name)
    if str(text).startswith("dynamic_network_architectures.building_blocks.") and name in BLOCKS:
        from dynamic_network_architectures.building_blocks import residual

        return getattr(residual, name)
    raise ModelError(f"{source}: plans.json names {text!r} in the architecture; XAIOverlay builds only torch.nn "
                     f"layers ({', '.join(LAYERS)}) and blocks {', '.join(BLOCKS)}")


def build_network(architecture: dict, in_channels: int, out_channels: int, source: Path) -> torch.nn.Module:
    """The configuration's network, as nnU-Net builds it for inference (deep supervision off)."""
    class_name = str(architecture.get("network_class_name", ""))
    short = class_name.rsplit(".", 1)[-1]
    if short not in NETWORKS or not class_name.startswith(("dynamic_network_architectures.architectures.", short)):
        raise ModelError(f"{source}: architecture class {class_name!r} is not supported; XAIOverlay builds "
                         f"{', '.join(NETWORKS)} of dynamic_network_architectures")
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise ModelError(f"nnU-Net models need dynamic-network-architectures; {INSTALL_HINT}") from None
    kwargs = dict(architecture.get("arch_kwargs") or {})
    for key in architecture.get("_kw_requires_import") or ():
        if key in kwargs:
            kwargs[key] = _layer_class(kwargs[key], source)
    if kwargs.get("conv_op") is not torch.nn.Conv3d:
        raise ModelError(f"{source}: this configuration is not a 3D network (conv_op {kwargs.get('conv_op')}); "
                         "choose a 3d_fullres or 3d_lowres model folder")
    kwargs["deep_supervision"] = False
    try:
        return getattr(unet, short)(input_channels=in_channels, num_classes=out_channels, **kwargs)
    except (TypeError, ValueError, AssertionError) as error:
        raise ModelError(f"{source}: cannot build {short} from plans.json ({str(error)[:160]})") from None


def outputs_of(dataset: dict, source: Path) -> tuple[list[str], str]:
    """Output channel names and activation from ``dataset.json``'s ``labels``: one channel per label value
    (softmax), or per region when a label lists several values (sigmoid, ``regions_class_order`` set)."""
    labels = {k: v for k, v in (dataset.get("labels") or {}).items() if k != "ignore"}
    if "background" not in labels:
        raise ModelError(f"{source}: dataset.json 'labels' needs a 'background' entry (label 0)")
    if any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        names = [k for k, v in labels.items() if any(int(x) != 0 for x in (v if isinstance(v, (list, tuple)) else [v]))]
        if len(names) != len(dataset.get("regions_class_order") or []):
            raise ModelError(f"{source}: dataset.json defines regions but its regions_class_order does not list one "
                             "entry per region")
        return names, "sigmoid"
    by_value = {int(v[0] if isinstance(v, (list, tuple)) else v): k for k, v in labels.items()}
    if sorted(by_value) != list(range(len(by_value))):
        raise ModelError(f"{source}: dataset.json labels {sorted(by_value)} are not consecutive from 0, "
                         "as nnU-Net needs")
    return [by_value[i] for i in range(len(by_value))], "softmax"


# --- folds ---------------------------------------------------------------------------------------
def fold_folders(path: Path, folds: str | None, checkpoint: str) -> list[Path]:
    """``fold_N`` folders to load: those listed (``"0,1"``, ``"all"`` = nnU-Net's fold_all), or every fold
    holding the checkpoint."""
    if checkpoint not in CHECKPOINTS:
        raise ModelError(f"unknown --checkpoint {checkpoint!r}; use final or best")
    filename = CHECKPOINTS[checkpoint]
    if folds is None:
        chosen = sorted((p for p in path.glob("fold_*") if (p / filename).is_file()), key=lambda p: p.name)
        if not chosen:
            raise ModelError(f"{path}: no fold_N/{filename} found; train a fold or pass --checkpoint "
                             f"{'best' if checkpoint == 'final' else 'final'} if only that one exists")
        return chosen
    names = [f.strip() for f in str(folds).split(",") if f.strip()]
    if not names or any(not (n.isdigit() or n == "all") for n in names):
        raise ModelError(f"--folds {folds!r}: give fold numbers separated by commas (0,1,2) or all (fold_all)")
    chosen = [path / f"fold_{n}" for n in names]
    for folder in chosen:
        if not (folder / filename).is_file():
            present = sorted(p.name for p in path.glob("fold_*") if (p / filename).is_file())
            raise ModelError(f"{folder / filename} is not there; folds with {filename}: "
                             f"{', '.join(present) or 'none'} (choose with --folds, or --checkpoint final|best)")
    return chosen


def load(path: Path, device: torch.device, amp: bool = False, *, folds: str | None = None,
         checkpoint: str = "final", tta: bool = False) -> LoadedModel:
    """Load an nnU-Net v2 trained-model folder (see the module docstring)."""
    missing = [name for name, module in (("scipy", "scipy"), ("scikit-image", "skimage"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ModelError(f"nnU-Net models need {' and '.join(missing)} for nnU-Net's resampling: "
                         f"pip install {' '.join(missing)} (or pip install 'xaioverlay[nnunet]')")
    dataset = read_json(path / "dataset.json")
    plans = read_json(path / "plans.json")
    folders = fold_folders(path, folds, checkpoint)
    checkpoints = [load_checkpoint(folder / CHECKPOINTS[checkpoint]) for folder in folders]
    name = checkpoints[0]["configuration"] or path.name.split("__")[-1]
    configuration = configuration_of(plans, name, path / "plans.json")
    if configuration.get("previous_stage"):
        raise ModelError(f"{path}: configuration {name!r} is a cascade stage that needs the previous stage's "
                         "segmentation as input; explain the 3d_lowres or 3d_fullres model instead")
    channel_names = [str(v) for _, v in sorted((dataset.get("channel_names") or dataset.get("modality") or {}).items(),
                                               key=lambda item: int(item[0]))]
    if not channel_names:
        raise ModelError(f"{path / 'dataset.json'}: has no channel_names; nnU-Net needs one entry per input channel")
    class_names, activation = outputs_of(dataset, path / "dataset.json")
    networks = []
    for folder, content in zip(folders, checkpoints):
        network = build_network(configuration.get("architecture") or {}, len(channel_names), len(class_names),
                                path / "plans.json")
        apply_state_dict(network, content["network_weights"], folder / CHECKPOINTS[checkpoint])
        networks.append(network)
    network = networks[0] if len(networks) == 1 else FoldEnsemble(networks)
    mirror_axes = checkpoints[0]["mirror_axes"]
    if tta and mirror_axes:
        network = MirroredTTA(network, mirror_axes)
    elif tta:
        log.warning("%s: the checkpoint allows no mirroring axes; --tta does nothing", path)
    patch = tuple(int(p) for p in configuration["patch_size"])
    digest = hashlib.sha256("".join(file_digest(f / CHECKPOINTS[checkpoint]) for f in folders).encode()).hexdigest()
    log.info("nnU-Net %s: configuration %s, folds %s", path.name, name, [f.name for f in folders])
    return LoadedModel(
        network=network.to(device),
        device=device,
        task=SEGMENTATION,
        class_names=class_names,
        channel_names=channel_names,
        in_channels=len(channel_names),
        activation=activation,
        transforms=NNUNetPreprocessing(plan_from(plans, configuration, path / "plans.json")),
        sliding_window=SlidingWindow(patch, overlap=0.5, mode="gaussian", sigma_scale=0.125, layout="nnunet"),
        example_shape=patch,
        source=path,
        format="nnunet",
        model_id=f"{path.name}[{','.join(f.name[5:] for f in folders)}]{'+tta' * bool(tta and mirror_axes)}"
                 f"@{digest[:12]}",
        amp=amp,
    )
