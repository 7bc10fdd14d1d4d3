"""The module's logic with an nnU-Net v2 trained-model folder: classes from dataset.json, folds chosen."""

from __future__ import annotations

import pytest
import slicer

from slicer_support import blob_volume, describe_now, load_volume, oblique_geometry
from xaioverlay.volumes import write_volume
from XAIOverlayLib import nodes
from XAIOverlayLib.logic import ExplainRequest
from XAIOverlayLib.target_spec import ROI, TargetChoice

pytest.importorskip("dynamic_network_architectures", reason="nnU-Net models need dynamic-network-architectures")


def test_folder_lists_its_classes_and_each_fold_choice_is_its_own_model(scene, logic, tmp_path):
    from nnunet_folder import write_model_folder

    folder = write_model_folder(tmp_path / "models", folds=(0, 1))
    info = describe_now(logic, folder, device="cpu", options={"folds": "0"})
    assert info["format"] == "nnunet" and info["class_names"] == ["background", "tumour", "oedema"]
    assert info["id"].startswith(folder.name + "[0]")
    geometry = oblique_geometry(size=(30, 28, 12), spacing=(1.2, 1.0, 2.5))
    centre = geometry.ijk_to_ras_points([[15, 14, 6]])[0]
    anatomy = load_volume(scene, write_volume(blob_volume(geometry, centre, 7.0, 2.0, 0.5), tmp_path / "MR.nrrd"), "MR")
    roi = slicer.vtkMRMLMarkupsROINode()
    scene.AddNode(roi)
    roi.SetCenter(*centre)
    roi.SetSize(10.0, 10.0, 10.0)
    jobs = {}
    for folds in ("0", "1"):
        request = ExplainRequest([anatomy], str(folder), ["gxi"], TargetChoice(key="tumour", region=ROI, roi=roi),
                                 device="cpu", model_options={"folds": folds})
        jobs[folds] = logic.wait(logic.explain(request))
        assert jobs[folds].state == "done", jobs[folds].error
        assert nodes.attribute(logic.map_nodes(jobs[folds])[0], "model").startswith(f"{folder.name}[{folds}]")
    assert jobs["0"].keys["gxi"] != jobs["1"].keys["gxi"]  # not taken from the other fold's cache
