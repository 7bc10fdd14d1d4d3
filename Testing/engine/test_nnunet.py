"""nnU-Net v2 trained-model folders: network build, preprocessing and geometry, prediction, safe loading, folds.

The reference is nnU-Net itself (``nnunetv2``, installed without its torchvision-pulling dependencies, see
the README): its network builder, its preprocessor and its ``nnUNetPredictor``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from support import blob_volume, oblique_geometry
from nnunet_folder import (CONFIGURATION, build_network, checkpoint_dict, make_dataset, make_plans,
                           write_model_folder)
from xaioverlay.errors import InputError, ModelError
from xaioverlay.explain import explain, to_input_grid
from xaioverlay.models import load_model
from xaioverlay.models.nnunet_preprocessing import Plan, preprocess_array
from xaioverlay.targets import resolve_target
from xaioverlay.volumes import Geometry, Volume, write_volume

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net models need dynamic-network-architectures")


def nnunetv2():
    return pytest.importorskip("nnunetv2", reason="nnU-Net's own code is the reference; see README (nnU-Net)")


def phantom(size=(36, 30, 14), spacing=(1.2, 1.0, 3.5), seed=1) -> Volume:
    """Oblique, anisotropic, a zeroed slab (so cropping to non-zero matters), a bright sphere."""
    geometry = oblique_geometry(size=size, spacing=spacing)
    centre = geometry.ijk_to_ras_points([[s // 2 for s in size]])[0]
    volume = blob_volume(geometry, centre, 8.0, value=2.0, background=0.5, noise=0.2, seed=seed)
    volume.array[:3] = 0
    return volume


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("nnunet"), folds=(0, 1))


def nnunet_reference(folder: Path, folds, image_file: Path, mirroring: bool = False):
    """nnU-Net's own predictor on a file: (segmentation, probabilities, properties, predictor), arrays [i, j, k]."""
    nnunetv2()
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    image, properties = SimpleITKIO().read_images([str(image_file)])
    segmentation, probabilities = predictor.predict_single_npy_array(image, properties, None, None, True)
    return segmentation.transpose(2, 1, 0), probabilities.transpose(0, 3, 2, 1), image, properties, predictor


# --- the network ---------------------------------------------------------------------------------
def test_network_is_built_as_nnunet_builds_it(folder):
    nnunetv2()
    from nnunet_folder import build_reference_network

    plans = json.loads((folder / "plans.json").read_text())
    dataset = json.loads((folder / "dataset.json").read_text())
    ours = load_model(folder, device="cpu", folds="0").network
    theirs = build_reference_network(plans, dataset, deep_supervision=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.decoder.deep_supervision is False
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs.eval()(x))


def test_residual_encoder_unet_plans_build_as_nnunet_builds_them():
    """nnU-Net's ResEnc presets name ResidualEncoderUNet with n_blocks_per_stage."""
    nnunetv2()
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from xaioverlay.models.nnunet import build_network

    architecture = make_plans()["configurations"][CONFIGURATION]["architecture"]
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    kwargs = architecture["arch_kwargs"]
    kwargs["n_blocks_per_stage"] = [1, 2, 2]
    del kwargs["n_conv_per_stage"]
    ours = build_network(architecture, 2, 3, Path("plans.json"))
    theirs = get_network_from_plans(architecture["network_class_name"], kwargs, architecture["_kw_requires_import"],
                                    2, 3, deep_supervision=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


# --- preprocessing and geometry --------------------------------------------------------------------
@pytest.mark.parametrize("transpose_forward, scheme, use_mask", [
    ((0, 1, 2), "ZScoreNormalization", False),
    ((2, 0, 1), "ZScoreNormalization", True),
    ((1, 2, 0), "CTNormalization", False),
])
def test_preprocessing_equals_nnunets_preprocessor(tmp_path, transpose_forward, scheme, use_mask):
    """Same array as nnU-Net's DefaultPreprocessor on the same file (SimpleITK axis order, transpose,
    crop, normalisation, separate-z resampling of a 3.5 mm axis)."""
    nnunetv2()
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = make_plans(transpose_forward=transpose_forward, scheme=scheme, use_mask=use_mask,
                       spacing=[(2.0, 1.5, 1.5)[t] for t in transpose_forward])
    folder = write_model_folder(tmp_path, plans=plans)
    volume = phantom()
    image_file = write_volume(volume, tmp_path / "case_0000.nii.gz")
    image, properties = SimpleITKIO().read_images([str(image_file)])
    manager = PlansManager(plans)
    expected, _, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        image, None, properties, manager, manager.get_configuration(CONFIGURATION), make_dataset())
    ours = load_model(folder, device="cpu").preprocess([volume]).tensor[0].numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_model_grid_affine_places_every_voxel_where_it_was():
    """A linear ramp of RAS position survives linear resampling: each model voxel holds the ramp's value at
    the position its affine gives, in an oblique anisotropic volume with a permuted nnU-Net axis order and
    a cropped border (order 1 here: a cubic spline's border effects would blur the check)."""
    geometry = oblique_geometry(size=(30, 26, 12), spacing=(1.2, 1.0, 2.0))
    i, j, k = np.meshgrid(*[np.arange(n) for n in geometry.size], indexing="ij")
    ras = geometry.ijk_to_ras_points(np.stack([i, j, k], -1).reshape(-1, 3)).reshape(*geometry.size, 3)
    slope = np.array([0.3, -0.2, 0.5])
    ramp = (ras @ slope + 100.0).astype(np.float32)
    ramp[:2] = 0  # cropped away
    plan = Plan(transpose_forward=(2, 0, 1), spacing=(1.5, 1.4, 1.1), schemes=("NoNormalization",),
                use_mask_for_norm=(False,), intensity_properties=({},), order=1, force_separate_z=None)
    data, affine = preprocess_array(ramp[None], geometry.ijk_to_ras(), plan)
    model_geometry = Geometry.from_ijk_to_ras(affine, data.shape[1:])
    inner = tuple(slice(1, n - 1) for n in data.shape[1:])
    u, v, w = np.meshgrid(*[np.arange(n)[s] for n, s in zip(data.shape[1:], inner)], indexing="ij")
    positions = model_geometry.ijk_to_ras_points(np.stack([u, v, w], -1).reshape(-1, 3))
    np.testing.assert_allclose(data[0][inner].ravel(), positions @ slope + 100.0, atol=1e-4)


def test_tiles_and_gaussian_are_placed_and_shaped_as_nnunets():
    nnunetv2()
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    from xaioverlay.sliding import nnunet_gaussian, nnunet_starts

    for size in (16, 21, 26, 40, 67, 100):
        assert nnunet_starts(size, 16, 0.5) == compute_steps_for_sliding_window((size,), (16,), 0.5)[0], size
    theirs = compute_gaussian((16, 12, 20), 1 / 8, 1, dtype=torch.float64, device=torch.device("cpu"))
    torch.testing.assert_close(nnunet_gaussian((16, 12, 20)).double(), theirs / theirs.max(), rtol=1e-6, atol=1e-12)


# --- prediction -------------------------------------------------------------------------------------
def nnunet_logits(predictor, image_file: Path) -> torch.Tensor:
    """nnU-Net's logits on its own preprocessed array (model grid), (K, X, Y, Z)."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    image, properties = predictor.plans_manager.image_reader_writer_class().read_images([str(image_file)])
    data, _, _ = DefaultPreprocessor(verbose=False).run_case_npy(
        image, None, properties, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
    return predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()


def assert_logits_agree(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    difference = (theirs - ours).abs()
    assert float(difference.median()) < 2e-3 and float(difference.flatten().quantile(0.99)) < 0.1
    assert float((theirs.argmax(0) == ours.argmax(0)).float().mean()) > 0.99


def test_prediction_equals_nnunets_predictor(folder, tmp_path):
    """Our logits on the model grid and labels on the input grid against nnUNetPredictor (one fold and
    the two-fold ensemble). nnU-Net accumulates the windows in float16; we keep float32, so logits agree
    to float16 precision except at tile corners, where its tiny Gaussian weights underflow. The input is
    anisotropic by less than 3 (nnU-Net returns more anisotropic volumes with nearest-neighbour along the
    coarse axis, XAIOverlay always linearly)."""
    volume = phantom(spacing=(1.2, 1.0, 2.5))
    image_file = write_volume(volume, tmp_path / "case_0000.nii.gz")
    for folds in ("0", "0,1"):
        model = load_model(folder, device="cpu", folds=folds)
        model_input = model.preprocess([volume])
        logits = model.infer(model_input.tensor)[0]
        segmentation, probabilities, _, _, predictor = nnunet_reference(
            folder, tuple(int(f) for f in folds.split(",")), image_file)
        assert_logits_agree(nnunet_logits(predictor, image_file), logits)
        ours = np.stack([to_input_grid(channel, model_input)[0].array for channel in logits]).argmax(0)
        inside = volume.array != 0
        assert (ours == segmentation)[inside].mean() > 0.99


PHANTOM_MODEL = (Path(__file__).resolve().parents[2] / "Resources" / "nnunet" / "Dataset001_Phantom"
                 / "nnUNetTrainer__nnUNetPlans__3d_fullres")


def test_shipped_phantom_model_segments_a_held_out_phantom_as_nnunets_predictor(tmp_path):
    """The trained model of Resources/nnunet on a held-out phantom in an oblique 1.25×1.25×3.5 mm grid."""
    from xaioverlay.phantoms import HELD_OUT_SEEDS, make_phantom

    geometry = oblique_geometry(size=(128, 160, 46), spacing=(1.25, 1.25, 3.5))
    half = geometry.direction_matrix @ ((np.asarray(geometry.size) - 1) / 2 * np.asarray(geometry.spacing))
    geometry = Geometry(geometry.size, geometry.spacing, tuple(-half), geometry.direction)  # centred on the head
    phantom = make_phantom(list(HELD_OUT_SEEDS)[2], geometry=geometry)
    image_file = write_volume(phantom.image, tmp_path / "case_0000.nii.gz")
    model = load_model(PHANTOM_MODEL, device="cpu")
    model_input = model.preprocess([phantom.image])
    logits = model.infer(model_input.tensor)[0]
    ours = np.stack([to_input_grid(channel, model_input)[0].array for channel in logits]).argmax(0) == 1
    segmentation, *_ = nnunet_reference(PHANTOM_MODEL, (0,), image_file)
    theirs = segmentation == 1
    assert theirs.sum() > 500
    assert 2 * (ours & theirs).sum() / (ours.sum() + theirs.sum()) >= 0.99
    truth = phantom.tumour_mask.array > 0
    assert 2 * (ours & truth).sum() / (ours.sum() + truth.sum()) > 0.85  # it did learn the tumour


def test_mirroring_tta_equals_nnunets_and_explanations_run_through_it(folder, tmp_path):
    volume = phantom(spacing=(1.2, 1.0, 2.5))
    image_file = write_volume(volume, tmp_path / "case_0000.nii.gz")
    model = load_model(folder, device="cpu", folds="0", tta=True)
    assert "+tta" in model.model_id
    logits = model.infer(model.preprocess([volume]).tensor)[0]
    *_, predictor = nnunet_reference(folder, (0,), image_file, mirroring=True)
    assert predictor.allowed_mirroring_axes == (0, 1, 2)
    assert_logits_agree(nnunet_logits(predictor, image_file), logits)
    plain = load_model(folder, device="cpu", folds="0").infer(model.preprocess([volume]).tensor)[0]
    assert float((plain - logits).abs().max()) > 0.1  # mirroring changes the output of this network
    centre = volume.geometry.ijk_to_ras_points([[18, 15, 7]])[0]
    result = explain(model, [volume], "gxi,lrp", "channel:tumour@point:{:.1f},{:.1f},{:.1f},6".format(*centre))
    assert all(np.abs(r.volume.array).max() > 0 for r in result.results)


def test_fold_ensemble_is_the_mean_of_the_folds_logits(folder):
    volume = phantom()
    single = [load_model(folder, device="cpu", folds=f) for f in ("0", "1")]
    both = load_model(folder, device="cpu")  # default: every fold present
    assert both.model_id.startswith(folder.name + "[0,1]")
    x = both.preprocess([volume]).tensor
    mean = (single[0].infer(x) + single[1].infer(x)) / 2
    torch.testing.assert_close(both.infer(x), mean, atol=1e-5, rtol=1e-5)


# --- explanations -------------------------------------------------------------------------------------
def test_methods_run_through_patches_and_maps_come_back_on_the_input_grid(folder):
    model = load_model(folder, device="cpu")
    volume = phantom()
    centre = volume.geometry.ijk_to_ras_points([[18, 15, 7]])[0]
    target = "channel:tumour@point:{:.1f},{:.1f},{:.1f},6".format(*centre)
    result = explain(model, [volume], "gradcam,gxi,lrp,occlusion", target)
    assert [r.name for r in result.results] == ["gradcam", "gxi", "lrp", "occlusion"]
    for method in result.results:
        assert method.volume.geometry.same_grid(volume.geometry), method.name
        assert np.isfinite(method.volume.array).all() and np.abs(method.volume.array).max() > 0, method.name
        assert method.parameters.get("windows", {"used": 1})["used"] >= 1


def test_window_by_window_gradient_equals_autograd_through_the_whole_fusion(folder):
    """Gradient × input summed over patches equals autograd through nnU-Net's Gaussian fusion of all patches."""
    from xaioverlay.sliding import blended_output

    model = load_model(folder, device="cpu", folds="0")
    volume = phantom()
    model_input = model.preprocess([volume])
    centre = volume.geometry.ijk_to_ras_points([[18, 15, 7]])[0]
    target = resolve_target("channel:tumour@point:{:.1f},{:.1f},{:.1f},6".format(*centre), model, model_input,
                            model.infer(model_input.tensor), "logit")
    from xaioverlay.explain import attribute
    from xaioverlay.methods import build_method

    windowed = attribute(build_method("gxi"), model, model_input, target).map
    x = model_input.tensor.clone().requires_grad_(True)
    score = target(blended_output(model.network, x, model.sliding_window))[0]
    (gradient,) = torch.autograd.grad(score, x)
    expected = (gradient * model_input.tensor)[0].sum(0)
    torch.testing.assert_close(windowed, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


# --- safe loading ---------------------------------------------------------------------------------------
class WritesAMarker:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a checkpoint's author could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_checkpoint_never_runs_and_is_refused_in_one_line(folder, tmp_path):
    evil = tmp_path / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "ran.txt"
    payload = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    payload["logging"]["extra"] = WritesAMarker(marker)
    torch.save(payload, evil / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError) as error:
        load_model(evil, device="cpu", folds="0")
    message = str(error.value)
    assert "\n" not in message and "refused: it holds io.open" in message  # builtins.open is io.open
    assert not marker.exists()
    torch.load(evil / "fold_0" / "checkpoint_final.pth", weights_only=False)  # the payload is real:
    assert marker.exists()  # full unpickling runs it


def test_checkpoint_as_nnunets_trainer_writes_it_loads_with_the_allow_list(folder):
    payload = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert isinstance(payload["_best_ema"], np.float64) and isinstance(payload["init_args"]["device"], torch.device)
    model = load_model(folder, device="cpu", folds="0")
    assert torch.equal(model.network.state_dict()["encoder.stages.0.0.convs.0.conv.weight"],
                       payload["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"])


# --- names, regions, bad folders -------------------------------------------------------------------------
def test_names_come_from_dataset_json(folder):
    model = load_model(folder, device="cpu", folds="0")
    assert model.class_names == ["background", "tumour", "oedema"] and model.activation == "softmax"
    assert model.channel_names == ["MRI"] and model.describe()["format"] == "nnunet"


def test_regions_use_sigmoid_and_region_names(tmp_path):
    dataset = make_dataset(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    model = load_model(write_model_folder(tmp_path, dataset=dataset), device="cpu")
    assert model.class_names == ["whole", "core"] and model.activation == "sigmoid"


def one_line_error(folder: Path, expected: str, **options) -> None:
    with pytest.raises(ModelError) as error:
        load_model(folder, device="cpu", **options)
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)


@pytest.mark.parametrize("change, expected, options", [
    (lambda f: (f / "dataset.json").unlink(), "dataset.json is missing", {}),
    (lambda f: (f / "plans.json").unlink(), "plans.json is missing", {}),
    (lambda f: None, "fold_3", {"folds": "3"}),
    (lambda f: None, "checkpoint_best.pth", {"checkpoint": "best"}),
    (lambda f: None, "--folds", {"folds": "zero"}),
])
def test_bad_folders_end_in_one_line(tmp_path, change, expected, options):
    folder = write_model_folder(tmp_path)
    change(folder)
    one_line_error(folder, expected, **options)


def edit_plans(folder: Path, edit) -> None:
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans)
    (folder / "plans.json").write_text(json.dumps(plans))


def test_plans_naming_other_code_or_configurations_are_refused(tmp_path):
    folder = write_model_folder(tmp_path)
    architecture = lambda p: p["configurations"][CONFIGURATION]["architecture"]  # noqa: E731
    edit_plans(folder, lambda p: architecture(p).update(network_class_name="os.system"))
    one_line_error(folder, "'os.system' is not supported")
    edit_plans(folder, lambda p: architecture(p).update(network_class_name=
               "dynamic_network_architectures.architectures.unet.PlainConvUNet"))
    edit_plans(folder, lambda p: architecture(p)["arch_kwargs"].update(nonlin="subprocess.Popen"))
    one_line_error(folder, "'subprocess.Popen'")
    edit_plans(folder, lambda p: p["configurations"].update({"2d": p["configurations"].pop(CONFIGURATION)}))
    one_line_error(folder, "no configuration '3d_fullres'; it has 2d")


def test_channels_not_matching_dataset_json_end_in_one_line(folder):
    model = load_model(folder, device="cpu", folds="0")
    with pytest.raises(InputError, match=r"1 input channel\(s\) \(MRI\) but got 2"):
        model.preprocess([phantom(), phantom()])


def test_nnunet_options_on_another_format_are_refused(tmp_path):
    from support import SMALL_UNET, save_spec_model

    spec = save_spec_model(tmp_path, SMALL_UNET, task="segmentation", class_names=["bg", "fg"])
    one_line_error(spec, "--folds applies to other model formats", folds="0")


def test_unknown_folder_lists_the_formats(tmp_path):
    one_line_error(tmp_path, "nnU-Net v2 trained-model folder")


# --- command line ------------------------------------------------------------------------------------------
def test_cli_explains_an_nnunet_folder_with_folds_and_checkpoint(folder, tmp_path):
    from xaioverlay.cli import main

    volume = phantom()
    image = write_volume(volume, tmp_path / "case.nrrd")
    out = tmp_path / "out"
    code = main(["explain", "--model", str(folder), "--folds", "0,1", "--checkpoint", "final", "--input", str(image),
                 "--methods", "gxi", "--target", "channel:tumour", "--out", str(out), "--device", "cpu"])
    assert code == 0
    record = json.loads((out / "explanation.json").read_text())
    assert record["model"]["format"] == "nnunet" and record["model"]["id"].startswith(folder.name + "[0,1]")
    import SimpleITK as sitk

    written = sitk.ReadImage(str(next(out.glob("gxi*.nrrd"))))
    assert Geometry.from_sitk(written).same_grid(volume.geometry)
