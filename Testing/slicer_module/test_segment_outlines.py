"""The Logic against real MRML: the segments a perturbation map was computed over are loaded beside it as a
segmentation node drawn as outlines, replaced with the map, and come back from the cache."""

from __future__ import annotations

from slicer_support import classifier_request, load_volume
from XAIOverlayLib import nodes


def segments_of(scene, map_node):
    found = nodes.owned_nodes(scene, nodes.SEGMENTS, map=map_node.GetID())
    assert len(found) <= 1
    return found[0] if found else None


def test_occlusion_over_segments_shows_their_outlines_over_the_map(scene, logic, models, lesion_case):
    _, path = lesion_case
    anatomy = load_volume(scene, path, "CT_1")
    request = classifier_request(anatomy, models["classifier"], methods=["occlusion", "gradcam"])
    request.segments = "cubes:12mm"
    job = logic.wait(logic.explain(request))
    assert job.state == "done", job.error
    occlusion, gradcam = logic.map_nodes(job)
    assert nodes.attribute(gradcam, "segments") is None and segments_of(scene, gradcam) is None
    segments = segments_of(scene, occlusion)
    assert segments is not None and nodes.attribute(occlusion, "segments") == segments.GetID()
    assert nodes.attribute(segments, "spec") == "cubes:12mm"
    record = nodes.attribute(occlusion, "record", parse=True)
    count = record["segments"]["count"]
    assert count >= 2 and segments.GetSegmentation().GetNumberOfSegments() == count
    display = segments.GetDisplayNode()
    assert display.GetVisibility2DOutline() and not display.GetVisibility2DFill()
    assert segments.GetTransformNodeID() == anatomy.GetTransformNodeID()
    assert nodes.hierarchy_item(scene, segments) and (
        nodes.subject_hierarchy(scene).GetItemParent(nodes.hierarchy_item(scene, segments))
        == nodes.subject_hierarchy(scene).GetItemParent(nodes.hierarchy_item(scene, occlusion)))

    # other segments: the same map node, its segments replaced (never two beside one map)
    request.segments = "cubes:24mm"
    again = logic.wait(logic.explain(request))
    assert again.state == "done", again.error
    assert logic.map_nodes(again)[0].GetID() == occlusion.GetID()
    replaced = segments_of(scene, occlusion)
    assert replaced.GetID() != segments.GetID() and scene.GetNodeByID(segments.GetID()) is None
    assert 2 <= replaced.GetSegmentation().GetNumberOfSegments() < count

    # the first run's map and segments come back from the cache, with no worker pass
    request.segments = "cubes:12mm"
    cached = logic.wait(logic.explain(request))
    assert cached.state == "done" and cached.status == "all maps from the cache"
    assert segments_of(scene, occlusion).GetSegmentation().GetNumberOfSegments() == count
