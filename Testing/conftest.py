"""Shared test settings and fixtures; the helpers they use live in ``support.py``."""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting starve each other on a shared, busy CPU: measured here, the
# same occlusion run took 11-22 s with 2 spinning threads and 1.2 s with passive waiting. Set before
# torch starts its thread pool; a value given by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

from support import SMALL_DENSENET, SMALL_UNET, save_spec_model  # noqa: E402


@pytest.fixture
def unet_spec(tmp_path) -> Path:
    return save_spec_model(tmp_path / "unet", SMALL_UNET, task="segmentation", class_names=["background", "tumour"])


@pytest.fixture
def densenet_spec(tmp_path) -> Path:
    return save_spec_model(tmp_path / "densenet", SMALL_DENSENET, task="classification", class_names=["no tumour", "tumour"])
