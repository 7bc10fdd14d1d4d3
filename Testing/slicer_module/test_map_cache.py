"""The on-disk map cache: complete entries only, keys that separate what differs (and follow what the
volume is now, not the file it came from), bounded size."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from XAIOverlayLib.cache import MapCache, cache_key, model_fingerprint, segmentation_key, volume_digest


def test_keys_differ_in_every_component_and_repeat_exactly():
    base = ("volume", "model", "gradcam", "class:tumour", "logit", "", "")
    assert cache_key(*base) == cache_key(*base)
    for index, other in enumerate(("volume2", "model2", "gradcam:layer4", "class:0", "probability", "net.layer", "measured:x")):
        changed = list(base)
        changed[index] = other
        assert cache_key(*changed) != cache_key(*base), index


def test_model_fingerprint_follows_the_weights_beside_a_spec(tmp_path):
    spec, weights = tmp_path / "net.yaml", tmp_path / "net.pt"
    spec.write_text("network: {}")
    weights.write_bytes(b"1")
    before = model_fingerprint(spec)
    time.sleep(0.01)
    weights.write_bytes(b"22")  # retrained weights, same spec
    assert model_fingerprint(spec) != before


def test_entries_round_trip_and_the_least_recently_used_go_first(tmp_path):
    source = tmp_path / "map.nrrd"
    source.write_bytes(b"x" * 1000)
    cache = MapCache(tmp_path / "cache", max_bytes=2500)  # room for two maps and their records
    for name in ("a", "b"):
        cache.put(name * 40, source, {"label": name})
    assert cache.get("a" * 40).record == {"label": "a"}
    old = time.time() - 100
    os.utime(cache.folder("b" * 40), (old, old))  # b used longest ago
    cache.put("c" * 40, source, {"label": "c"})
    assert cache.get("b" * 40) is None
    assert cache.get("a" * 40) is not None and cache.get("c" * 40).path.read_bytes() == b"x" * 1000
    assert not list((tmp_path / "cache").rglob(".*"))  # no staging folder left behind


# --- Windows: a file held open by another program can be neither removed nor renamed over (Linux allows
# both, so the failures are made by hand: shutil.rmtree and os.replace as they fail there) ---
def _held_open_rmtree(real):
    """shutil.rmtree as on Windows while a file inside a cache entry is open: the entry cannot be removed
    (``ignore_errors`` leaves it in place); anything else (the staging folder) is removed as usual."""
    def rmtree(path, ignore_errors=False, **kwargs):
        if Path(path).name.startswith(".") and not Path(path).name.startswith(".replaced-"):
            return real(path, ignore_errors=ignore_errors, **kwargs)
        if ignore_errors:
            return None
        raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                              str(path))
    return rmtree


def test_an_entry_whose_file_is_held_open_is_still_replaced(tmp_path, monkeypatch):
    import shutil

    from XAIOverlayLib import cache as cache_module

    source = tmp_path / "map.nrrd"
    source.write_bytes(b"old")
    cache = MapCache(tmp_path / "cache")
    cache.put("k" * 40, source, {"label": "old"})
    monkeypatch.setattr(cache_module.shutil, "rmtree", _held_open_rmtree(shutil.rmtree))
    source.write_bytes(b"new")
    stored = cache.put("k" * 40, source, {"label": "new"})
    assert stored.path.read_bytes() == b"new" and cache.get("k" * 40).record == {"label": "new"}
    monkeypatch.undo()  # the file is closed: the next put (its prune) clears what was renamed aside
    cache.put("m" * 40, source, {"label": "m"})
    assert not list((tmp_path / "cache").rglob(".*"))


def test_a_swap_that_keeps_failing_keeps_the_complete_entry_and_a_brief_failure_is_retried(tmp_path, monkeypatch):
    from XAIOverlayLib import cache as cache_module

    monkeypatch.setattr(cache_module, "SWAP_PAUSE_S", 0.0, raising=False)
    source = tmp_path / "map.nrrd"
    source.write_bytes(b"first")
    cache = MapCache(tmp_path / "cache")
    cache.put("k" * 40, source, {"label": "first"})
    real_replace, failures = os.replace, []

    def replace(src, dst):
        if len(failures) < limit:
            failures.append(dst)
            raise PermissionError(13, "Access is denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(cache_module.os, "replace", replace)
    limit = 100  # held for good: the same key is the same map, so the entry there is kept, not an error
    kept = cache.put("k" * 40, source, {"label": "second"})
    assert len(failures) == cache_module.SWAP_ATTEMPTS and kept.record == {"label": "first"}
    assert cache.get("k" * 40).path.read_bytes() == b"first"
    failures.clear()
    limit = 2  # held for a moment (a virus scanner): the third try replaces the entry
    source.write_bytes(b"third")
    assert cache.put("k" * 40, source, {"label": "third"}).path.read_bytes() == b"third"
    assert cache.get("k" * 40).record == {"label": "third"} and len(failures) == 2
    assert not list((tmp_path / "cache").rglob(".*"))  # no staging folder left behind


# --- keys that are never stale: the voxels and geometry as they are now, the engine, device and precision ---
def _volume():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([0.9, 0.9, 3.0, 1.0])
    affine[:3, 3] = (10.0, -20.0, 5.0)
    return array, affine


def test_volume_digest_follows_every_voxel_and_the_geometry():
    array, affine = _volume()
    base = volume_digest(array, affine)
    assert volume_digest(array.copy(), affine.copy()) == base  # an unchanged volume: the same key
    edited = array.copy()
    edited[2, 3, 4] += 1
    spacing, origin, direction = affine.copy(), affine.copy(), affine.copy()
    spacing[2, 2] = 2.5
    origin[0, 3] += 0.01
    direction[:2, :2] = [[0.0, -0.9], [0.9, 0.0]]
    for other in ((edited, affine), (array, spacing), (array, origin), (array, direction),
                  (array.astype(np.float32), affine)):
        assert volume_digest(*other) != base


def test_keys_follow_device_mixed_precision_and_engine_version():
    import xaioverlay

    base = ("volume", "model", "gradcam", "class:tumour")
    key = cache_key(*base, device="cpu", amp=False, version="0.1.0")
    assert cache_key(*base) == cache_key(*base, device="cpu", amp=False, version=xaioverlay.__version__)
    for change in ({"device": "cuda:0"}, {"amp": True}, {"version": "0.2.0"}):
        assert cache_key(*base, **{"device": "cpu", "amp": False, "version": "0.1.0", **change}) != key, change
        assert segmentation_key("volume", "model", **{"device": "cpu", "amp": False, "version": "0.1.0", **change}) \
            != segmentation_key("volume", "model", device="cpu", amp=False, version="0.1.0"), change


def test_keys_are_made_without_the_engines_dependencies(tmp_path):
    """In Slicer the module builds keys before PyTorch and MONAI are installed."""
    import xaioverlay

    code = ("import sys; sys.modules['torch'] = sys.modules['monai'] = None\n"
            "from XAIOverlayLib.cache import cache_key, engine_version\n"
            "cache_key('v', 'm', 'gradcam', 'default'); print(engine_version())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(xaioverlay.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == xaioverlay.__version__


def _edit_one_voxel(node) -> None:
    """As Slicer's ``arrayFromVolume`` + ``arrayFromVolumeModified`` do."""
    from vtk.util import numpy_support

    scalars = node.GetImageData().GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars)[0] += 500
    scalars.Modified()
    node.GetImageData().Modified()


def test_a_case_edited_or_hardened_is_known_by_its_voxels_not_its_file(scene, lesion_case):
    import slicer

    from slicer_support import linear_transform
    from XAIOverlayLib import cases, nodes

    _, path = lesion_case
    case = cases.Case("CT_1", path=path)
    node = cases.load_case(scene, case)
    as_loaded = nodes.content_digest([node])
    assert as_loaded == nodes.combine_digests([case.file_digest()])  # the background run's key finds it
    shift = np.eye(4)
    shift[0, 3] = 50.0
    node.SetAndObserveTransformNodeID(linear_transform(scene, shift).GetID())
    assert nodes.content_digest([node]) == as_loaded  # placed under a transform: same voxels, same frame
    slicer.vtkSlicerTransformLogic.hardenTransform(node)
    hardened = nodes.content_digest([node])
    assert hardened != as_loaded
    _edit_one_voxel(node)
    assert nodes.content_digest([node]) not in (as_loaded, hardened)


@pytest.mark.parametrize("loaded_by", ["case list", "user"])
def test_an_edited_volume_is_explained_again_and_an_unchanged_one_is_not(scene, logic, models, lesion_case, loaded_by):
    from slicer_support import classifier_request, load_volume
    from XAIOverlayLib import cases, nodes

    _, path = lesion_case
    if loaded_by == "case list":
        node = cases.load_case(scene, cases.Case("CT_1", path=path))
    else:
        node = load_volume(scene, path, "CT_1")
    first = logic.wait(logic.explain(classifier_request(node, models["classifier"], methods=["gradcam"])))
    assert first.state == "done", first.error
    again = logic.wait(logic.explain(classifier_request(node, models["classifier"], methods=["gradcam"])))
    assert again.state == "done" and again.request_id is None  # unchanged: from the cache
    _edit_one_voxel(node)  # voxel (0, 0, 0), outside the head, now the brightest
    edited = logic.wait(logic.explain(classifier_request(node, models["classifier"], methods=["gradcam"])))
    assert edited.state == "done" and edited.request_id is not None, edited.error  # computed, not the old map
    heat = nodes.voxels(logic.map_nodes(edited)[0])
    assert np.unravel_index(int(np.argmax(heat)), heat.shape) == (0, 0, 0)
