"""Non-finite values in a map are counted, recorded and shown, not silently zeroed."""

from __future__ import annotations

import json

import numpy as np

from support import kinks_volume, save_square_root_kinks
from xaioverlay.cli import main
from xaioverlay.volumes import Geometry, read_volume, write_volume

GRID = Geometry((12, 10, 8), (1.0, 1.0, 2.0), (5.0, -3.0, 1.0))


def test_non_finite_gradient_values_are_counted_in_the_record_and_warned_about_on_the_command_line(tmp_path, capsys):
    model = save_square_root_kinks(tmp_path / "model")
    volume, expected = kinks_volume(GRID)
    image = write_volume(volume, tmp_path / "kinks.nrrd")
    code = main(["explain", "--model", str(model), "--input", str(image), "--methods", "gxi",
                 "--target", "class:high", "--out", str(tmp_path / "out"), "--progress", "none", "--no-montage"])
    err = capsys.readouterr().err
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())
    (method,) = record["methods"]
    assert method["non_finite"] == expected and all(expected.values())
    bad = sum(expected.values())
    assert f"xaioverlay: warning: Gradient × input: {bad} of {volume.array.size} map values were not finite" in err
    # the written map holds 0 where the values were not finite, the true gradient × input elsewhere
    written = read_volume(tmp_path / "out" / method["file"]).array
    kinked = volume.array != 3
    assert (written[kinked] == 0).all()
    np.testing.assert_allclose(written[~kinked], 3 * (1 / (2 * np.sqrt(3)) + 1 / (2 * np.sqrt(2)) - 1), rtol=1e-5)


def test_a_finite_map_records_zero_non_finite_values_and_warns_about_nothing(tmp_path, capsys):
    model = save_square_root_kinks(tmp_path / "model")
    volume, _ = kinks_volume(GRID)
    volume.array[:] = 3.0
    image = write_volume(volume, tmp_path / "plain.nrrd")
    code = main(["explain", "--model", str(model), "--input", str(image), "--methods", "gxi", "--target", "class:high",
                 "--out", str(tmp_path / "out"), "--progress", "none", "--no-montage"])
    err = capsys.readouterr().err
    assert code == 0 and "warning" not in err
    record = json.loads((tmp_path / "out" / "explanation.json").read_text())
    assert record["methods"][0]["non_finite"] == {"nan": 0, "posinf": 0, "neginf": 0}
