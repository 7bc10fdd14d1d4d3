"""The on-disk map cache: complete entries only, keys that separate what differs, bounded size."""

from __future__ import annotations

import os
import time

from XAIOverlayLib.cache import MapCache, cache_key, model_fingerprint


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
