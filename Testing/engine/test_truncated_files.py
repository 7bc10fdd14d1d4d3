"""A volume file cut short or damaged is refused in one line naming it, in every format; whole files still read."""

from __future__ import annotations

import re

import numpy as np
import pytest

from support import oblique_geometry
from xaioverlay.errors import InputError
from xaioverlay.volumes import Volume, read_volume, write_volume

# (file written, compressed, file holding the voxels)
FORMATS = [
    ("v.nii", False, "v.nii"), ("v.nii.gz", True, "v.nii.gz"),
    ("v.nrrd", False, "v.nrrd"), ("v.nrrd", True, "v.nrrd"), ("v.nhdr", False, "v.raw"), ("v.nhdr", True, "v.raw.gz"),
    ("v.mha", False, "v.mha"), ("v.mha", True, "v.mha"), ("v.mhd", False, "v.raw"), ("v.mhd", True, "v.zraw"),
]
IDS = [f"{name}{'-compressed' if compressed else ''}" for name, compressed, _ in FORMATS]
ARRAY = (np.random.default_rng(3).normal(300, 200, (40, 36, 24))).astype(np.int16)


def written(tmp_path, name: str, compressed: bool):
    path = write_volume(Volume(ARRAY, oblique_geometry(size=ARRAY.shape)), tmp_path / name, compress=compressed)
    return path


def header_length(path) -> int:
    """Bytes of the header at the start of ``path`` (the whole file for a detached header)."""
    data = path.read_bytes()
    for pattern in (rb"\n\n", rb"ElementDataFile = LOCAL\n"):
        found = re.search(pattern, data)
        if found:
            return found.end()
    return 352 if path.name.endswith(".nii") else len(data)


def refused(path, culprit) -> str:
    with pytest.raises(InputError) as error:
        read_volume(path)
    message = str(error.value)
    assert str(culprit) in message and "is truncated or corrupt" in message, message
    assert "re-export or re-copy it" in message, message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name,compressed,data_name", FORMATS, ids=IDS)
def test_whole_files_still_read_and_a_separate_data_file_keeps_its_plain_name(tmp_path, name, compressed, data_name):
    np.testing.assert_array_equal(read_volume(written(tmp_path, name, compressed)).array, ARRAY)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, data_name})  # no temporary names left


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("name,compressed,data_name", FORMATS, ids=IDS)
def test_a_file_cut_short_is_refused_naming_it(tmp_path, name, compressed, data_name, fraction):
    path = written(tmp_path, name, compressed)
    data_file = tmp_path / data_name
    data = data_file.read_bytes()
    data_file.write_bytes(data[: int(len(data) * fraction)])
    refused(path, data_file)


@pytest.mark.parametrize("name,compressed,data_name", FORMATS, ids=IDS)
def test_a_header_cut_in_the_middle_is_refused(tmp_path, name, compressed, data_name):
    path = written(tmp_path, name, compressed)
    data = path.read_bytes()
    cut = 30 if name.endswith(".gz") else header_length(path) // 2
    path.write_bytes(data[:cut])
    refused(path, path)


@pytest.mark.parametrize("name,data_name", [("v.nii.gz", "v.nii.gz"), ("v.nhdr", "v.raw.gz"), ("v.mha", "v.mha")])
def test_damaged_compressed_data_is_refused(tmp_path, name, data_name):
    path = written(tmp_path, name, True)
    data_file = tmp_path / data_name
    data = bytearray(data_file.read_bytes())
    data[-6] ^= 0xFF  # inside the checksum (gzip CRC-32 and length, zlib Adler-32): only a full decompression sees it
    data_file.write_bytes(bytes(data))
    assert "damaged" in refused(path, data_file)
