"""Helpers shared by the engine, metrics and cohort tests: small real MONAI networks saved as spec models and
bundles, volumes with known geometry. A plain module (``from support import ...``), not the conftest: pytest
imports every folder's conftest.py under the one name ``conftest``, so names imported from it depend on which
folder's conftest was loaded last."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import torch
import yaml

from xaioverlay.volumes import Geometry, Volume


def rotation_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def rotation_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def oblique_geometry(size=(48, 40, 24), spacing=(1.2, 1.0, 3.0), origin=(35.0, -12.0, 40.0),
                     angles=(0.35, 0.2)) -> Geometry:
    """Anisotropic, oblique (rotated about z then x), non-zero origin: the hard case for geometry."""
    direction = rotation_z(angles[0]) @ rotation_x(angles[1])
    return Geometry(tuple(size), tuple(spacing), tuple(origin), tuple(direction.ravel()))


def blob_volume(geometry: Geometry, centre_ras, radius_mm: float, value: float = 1.0, background: float = 0.0,
                noise: float = 0.0, seed: int = 0) -> Volume:
    """A sphere of ``value`` at a physical (RAS) place on ``geometry``."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij")
    ras = geometry.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*geometry.size, 3)
    inside = np.linalg.norm(ras - np.asarray(centre_ras), axis=-1) <= radius_mm
    array = np.where(inside, value, background).astype(np.float32)
    if noise:
        array += np.random.default_rng(seed).normal(0, noise, array.shape).astype(np.float32)
    return Volume(array, geometry, "blob")


def save_spec_model(folder: Path, network: dict, *, task: str, class_names: list[str], activation: str = "softmax",
                    preprocessing: list | None = None, sliding_window: dict | None = None, seed: int = 0,
                    state_dict: dict | None = None, name: str = "model") -> Path:
    """Build a ``monai.networks.nets`` network (seeded), save its weights and a spec; returns the spec path."""
    import monai.networks.nets as nets

    torch.manual_seed(seed)
    model = getattr(nets, network["name"])(**network["args"])
    if state_dict is not None:
        model.load_state_dict(state_dict)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / f"{name}.pt")
    spec = {"network": network, "weights": f"{name}.pt", "task": task, "activation": activation,
            "class_names": class_names, "preprocessing": preprocessing or []}
    if sliding_window:
        spec["sliding_window"] = sliding_window
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


SMALL_UNET = {"name": "UNet", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}}
SMALL_DENSENET = {"name": "DenseNet121", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                                  "init_features": 8, "growth_rate": 4, "block_config": [2, 2, 2, 2]}}


def save_bundle(folder: Path, network_def: dict, state_dict: dict, *, preprocessing: list | None = None,
                inferer: dict | None = None, activation: str = "softmax", output_type: str = "image",
                class_names: list[str] | None = None, in_channels: int = 1) -> Path:
    """Write a MONAI bundle (configs/inference.json, configs/metadata.json, models/model.pt) as the Model Zoo lays
    it out.

    ``preprocessing`` lists the transforms after ``LoadImaged``/``EnsureChannelFirstd`` (which are added, as in real
    bundles).
    """
    import json

    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    torch.save(state_dict, folder / "models" / "model.pt")
    transforms = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"}]
    transforms += preprocessing or []
    inference = {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        "inferer": inferer or {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose",
                           "transforms": [{"_target_": "Activationsd", "keys": "pred", activation: True}]},
    }
    names = class_names or ["background", "foreground"]
    metadata = {
        "version": "0.1.0", "name": folder.name, "task": "test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": in_channels, "spatial_shape": [32, 32, 32]}},
            "outputs": {"pred": {"type": output_type, "num_channels": len(names),
                                 "channel_def": {str(i): n for i, n in enumerate(names)}}},
        },
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference, indent=1))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1))
    return folder


class SquareRootKinks(torch.nn.Module):
    """A classifier whose logit is finite but whose input gradient is not, at known voxels.

    Logit 1 is ``Σ √x⁺ + √(x − 1)⁺ − 2 √(x − 2)⁺``: its derivative is +∞ at x = 0, 1 and −∞ at
    x = 2, so gradient × input is NaN (0 · ∞) where x = 0, +∞ where x = 1 and −∞ where x = 2, finite
    elsewhere.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.clamp(min=0).sqrt() + (x - 1).clamp(min=0).sqrt() - 2 * (x - 2).clamp(min=0).sqrt()
        score = f.flatten(1).sum(1)
        return torch.stack([-score, score], 1)


def save_square_root_kinks(folder: Path) -> Path:
    """:class:`SquareRootKinks` as a TorchScript file with a sidecar spec; returns the ``.ts`` path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kinks.ts"
    torch.jit.script(SquareRootKinks()).save(str(path))
    (folder / "kinks.yaml").write_text(yaml.safe_dump({"task": "classification", "class_names": ["low", "high"],
                                                       "activation": "none"}))
    return path


def kinks_volume(geometry: Geometry) -> tuple[Volume, dict[str, int]]:
    """A volume of 3s with slabs of 0, 1 and 2, and how many gradient × input values of
    :class:`SquareRootKinks` are NaN, +inf and -inf on it."""
    array = np.full(geometry.size, 3.0, dtype=np.float32)
    array[:3] = 0.0
    array[3:5, :4] = 1.0
    array[-1, :2, :5] = 2.0
    counts = {"nan": int((array == 0).sum()), "posinf": int((array == 1).sum()), "neginf": int((array == 2).sum())}
    return Volume(array, geometry, "kinks"), counts


def default_ctrl_c() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT (POSIX): the signal's default action restored.
    A shell's background job (``pytest ... &``) starts with SIGINT ignored, children inherit that, and a Python
    started so installs no KeyboardInterrupt handler: the test's Ctrl-C would be ignored and the run complete."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_bundle_layout(root: Path) -> None:
    """A MONAI bundle as the project ships them: the four files, at most 10 MB in all."""
    for part in ("configs/inference.json", "configs/metadata.json", "models/model.pt", "docs/README.md"):
        assert (root / part).is_file(), part
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) <= 10 * 1024 * 1024
