"""A tiny nnU-Net v2 trained-model folder written the way nnU-Net writes one (for the nnU-Net tests).

plans.json / dataset.json follow nnU-Net v2's planner output; each checkpoint is the dict nnU-Net's trainer
saves (``nnUNetTrainer.save_checkpoint``): network weights, optimizer state, the training log with numpy
scalars, the init arguments (plans, configuration, fold, dataset.json, a torch.device) and so on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

CONFIGURATION = "3d_fullres"
FOLDER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"


def architecture(features=(4, 8, 16)) -> dict:
    stages = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": stages, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3]] * stages, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (stages - 1),
            "n_conv_per_stage": [2] * stages, "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def make_plans(patch=(16, 16, 16), spacing=(2.0, 1.5, 1.5), transpose_forward=(0, 1, 2),
               scheme="ZScoreNormalization", use_mask=False, channels=1, features=(4, 8, 16)) -> dict:
    return {
        "dataset_name": "Dataset900_Tiny", "plans_name": "nnUNetPlans",  # the folder name written below
        "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [40, 40, 40],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose_forward),
        "transpose_backward": [int(i) for i in np.argsort(transpose_forward)],
        "configurations": {CONFIGURATION: {
            "data_identifier": f"nnUNetPlans_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [40, 40, 40],
            "spacing": list(spacing), "normalization_schemes": [scheme] * channels,
            "use_mask_for_norm": [use_mask] * channels,
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
            "architecture": architecture(features), "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {"max": 3.0, "mean": 1.0, "median": 1.0, "min": -1.0, "percentile_00_5": -0.5,
                     "percentile_99_5": 2.5, "std": 0.5} for c in range(channels)},
    }


def make_dataset(channels=("MRI",), labels=None, regions_class_order=None) -> dict:
    dataset = {"channel_names": {str(i): n for i, n in enumerate(channels)},
               "labels": labels or {"background": 0, "tumour": 1, "oedema": 2},
               "numTraining": 20, "file_ending": ".nii.gz"}
    if regions_class_order is not None:
        dataset["regions_class_order"] = regions_class_order
    return dataset


def build_reference_network(plans: dict, dataset: dict, deep_supervision: bool = True) -> torch.nn.Module:
    """The network as nnU-Net's own code builds it (``get_network_from_plans``: pydoc imports)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans["configurations"][CONFIGURATION]["architecture"]
    labels = dataset["labels"]
    regions = any(isinstance(v, list) and len(v) > 1 for v in labels.values())
    outputs = len(dataset.get("regions_class_order") or []) if regions else len([k for k in labels if k != "ignore"])
    return get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                  len(dataset["channel_names"]), outputs, deep_supervision=deep_supervision)


def build_network(plans: dict, dataset: dict) -> torch.nn.Module:
    """The same network built directly with dynamic_network_architectures (no nnunetv2 needed)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kwargs = dict(plans["configurations"][CONFIGURATION]["architecture"]["arch_kwargs"])
    kwargs.update(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, dropout_op=None, nonlin=torch.nn.LeakyReLU)
    labels = dataset["labels"]
    regions = any(isinstance(v, list) and len(v) > 1 for v in labels.values())
    outputs = len(dataset.get("regions_class_order") or []) if regions else len(labels)
    return PlainConvUNet(input_channels=len(dataset["channel_names"]), num_classes=outputs, deep_supervision=True,
                         **kwargs)


def checkpoint_dict(network: torch.nn.Module, plans: dict, dataset: dict, fold) -> dict:
    """What ``nnUNetTrainer.save_checkpoint`` writes."""
    optimizer = torch.optim.SGD(network.parameters(), 0.01, momentum=0.99, nesterov=True)
    return {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.75)], "ema_fg_dice": [np.float64(0.75)],
                    "dice_per_class_or_region": [[np.float64(0.75), np.float64(0.5)]],
                    "train_losses": [np.float64(0.7)], "val_losses": [np.float64(0.6)], "lrs": [0.01],
                    "epoch_start_timestamps": [time.time() - 1], "epoch_end_timestamps": [time.time()]},
        "_best_ema": np.float64(0.75),
        "current_epoch": 1,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def write_model_folder(root: Path, *, folds=(0,), plans: dict | None = None, dataset: dict | None = None,
                       seed: int = 0, checkpoint: str = "checkpoint_final.pth") -> Path:
    """A trained-model folder under ``root`` with seeded random weights per fold; returns its path."""
    plans = plans or make_plans()
    dataset = dataset or make_dataset()
    folder = root / "Dataset900_Tiny" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    for fold in folds:
        torch.manual_seed(seed + 1000 * (fold if isinstance(fold, int) else 99))
        network = build_network(plans, dataset)
        for module in network.modules():  # affine norms away from identity, so they matter in the test
            if isinstance(module, torch.nn.InstanceNorm3d):
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
                torch.nn.init.uniform_(module.bias, -0.2, 0.2)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(checkpoint_dict(network, plans, dataset, fold), folder / f"fold_{fold}" / checkpoint)
    return folder
