"""Is a volume file complete? Checks run before SimpleITK reads it.

SimpleITK reads a NIfTI file cut short without any error: the missing voxels come back as zeros (or
whatever the decompressor left). So every file is checked first, by what its header promises:

- compressed data (``.nii.gz``; NRRD ``encoding: gzip|bzip2``; MetaImage ``CompressedData = True``) is
  decompressed to its end, in chunks, which checks the end-of-stream marker and the checksum;
- the data's length is compared with the header's voxel count × bytes per voxel (plus its offset).

A DICOM series is checked file by file: GDCM leaves a slice it cannot parse out of the series without
an error, so a file with the DICOM marker that belongs to no series is refused.
"""

from __future__ import annotations

import bz2
import gzip
import math
import re
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import InputError

#: Bytes read or decompressed at a time: the check never holds more than this of a volume.
CHUNK = 16 * 2**20


class Damaged(Exception):
    """A file is shorter than its header says, or its compressed stream is broken (message: why).

    ``file``: the damaged file when it is not the one read (a header's separate data file)."""

    def __init__(self, reason: str, file: Path | None = None) -> None:
        super().__init__(reason)
        self.file = file


def refusal(path: Path, reason: str, header: Path | None = None) -> InputError:
    """The one-line refusal; ``header``: the header whose data file ``path`` is, if it is one."""
    whose = f" (the data of {header.name})" if header is not None and header != path else ""
    return InputError(f"{path}{whose} is truncated or corrupt ({reason}); re-export or re-copy it")


def _stream_size(stream: BinaryIO) -> int:
    """Bytes left in ``stream``, read to its end (a decompressing stream checks its end and checksum)."""
    total = 0
    try:
        while chunk := stream.read(CHUNK):
            total += len(chunk)
    except EOFError:
        raise Damaged("the compressed stream ends early") from None
    except (OSError, zlib.error) as error:
        raise Damaged(f"the compressed data is damaged: {error}") from None
    return total


def _zlib_size(handle: BinaryIO) -> int:
    """Bytes a zlib (or gzip) stream inflates to, read from ``handle``'s position (MetaImage's format)."""
    inflater, total = zlib.decompressobj(zlib.MAX_WBITS | 32), 0
    try:
        while not inflater.eof:
            data = inflater.unconsumed_tail or handle.read(CHUNK)
            if not data:
                raise Damaged("the compressed stream ends early")
            total += len(inflater.decompress(data, CHUNK))
    except zlib.error as error:
        raise Damaged(f"the compressed data is damaged: {error}") from None
    return total


def _data_size(path: Path, offset: int, encoding: str) -> int:
    """Bytes of data from ``offset`` on, decompressed when ``encoding`` says so ("raw", "gzip", "bzip2", "zlib")."""
    if encoding == "raw":
        return max(0, path.stat().st_size - offset)
    opener: Callable[[BinaryIO], BinaryIO] | None = {"gzip": gzip.GzipFile, "bzip2": bz2.BZ2File}.get(encoding)
    with path.open("rb") as handle:
        handle.seek(offset)
        try:
            if opener is None:
                return _zlib_size(handle)
            with opener(fileobj=handle) as stream:
                return _stream_size(stream)
        except Damaged as damage:
            raise Damaged(str(damage), path) from None


def _need(available: int, expected: int, file: Path | None = None) -> None:
    if available < expected:
        raise Damaged(f"{available} of the {expected} data bytes its header announces", file)


def check_nifti(path: Path) -> None:
    """NIfTI-1 or -2, plain or gzip-compressed: header, then vox_offset + voxels × bitpix / 8 bytes."""
    compressed = path.name.lower().endswith(".gz")
    with (gzip.open(path, "rb") if compressed else path.open("rb")) as stream:
        try:
            head = stream.read(540)
        except EOFError:
            raise Damaged("the compressed stream ends early") from None
        except (OSError, zlib.error) as error:
            raise Damaged(f"the compressed data is damaged: {error}") from None
        if len(head) < 4:
            raise Damaged("the header ends early")
        for endian in "<>":
            (header_size,) = struct.unpack(endian + "i", head[:4])
            if header_size in (348, 540):
                break
        else:
            return  # not a NIfTI header: SimpleITK says what it is not
        if len(head) < header_size:
            raise Damaged("the header ends early")
        if header_size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            (bits,) = struct.unpack(endian + "h", head[72:74])
            (offset,) = struct.unpack(endian + "f", head[108:112])
        else:
            (bits,) = struct.unpack(endian + "h", head[14:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            (offset,) = struct.unpack(endian + "q", head[168:176])
        count = math.prod(max(1, d) for d in dims[1:1 + min(max(dims[0], 1), 7)])
        expected = max(int(offset), header_size) + count * max(bits, 0) // 8
        available = len(head) + _stream_size(stream) if compressed else path.stat().st_size
    _need(available, expected)


def _fields(lines: list[str], separator: str) -> dict[str, str]:
    fields = {}
    for line in lines:
        key, found, value = line.partition(separator)
        if found and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip()
    return fields


def _separate_file(header: Path, name: str) -> Path | None:
    """The data file a header names, or None for lists and numbered series (not checked)."""
    if not name or name.upper().startswith("LIST") or "%" in name or " " in name.strip():
        return None
    data = header.parent / name
    if not data.exists():
        raise InputError(f"{header}: its data file {data} does not exist; keep it beside the header")
    return data


def _nrrd_type_size(name: str) -> int:
    """Bytes per value of a NRRD ``type:`` name (0 when unknown: a size is never over-estimated)."""
    name = name.lower()
    if re.search(r"char|int8", name):
        return 1
    if re.search(r"short|int16", name):
        return 2
    if re.search(r"long\s*long|int64|double", name):
        return 8
    return 4 if re.search(r"int|float", name) else 0


def check_nrrd(path: Path) -> None:
    """NRRD (``.nrrd`` with its data attached, ``.nhdr`` with a data file): sizes × type against the data."""
    with path.open("rb") as handle:
        head = handle.read(CHUNK)
    if not head.startswith(b"NRRD"):
        return
    end = re.search(rb"\r?\n\r?\n", head)
    lines = head[: end.start() if end else len(head)].decode("latin-1").splitlines()
    fields = _fields(lines[1:], ": ")
    data_name = fields.get("data file") or fields.get("datafile")
    if end is None and not data_name:
        raise Damaged("the header ends early")
    if "sizes" not in fields or "type" not in fields or "encoding" not in fields:
        raise Damaged("the header ends early") if end is None else Damaged("the header lacks sizes, type or encoding")
    encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(fields["encoding"])
    if encoding is None or int(fields.get("line skip", fields.get("lineskip", "0")) or 0):
        return  # text encodings and skipped lines: SimpleITK parses those itself
    if data_name:
        data = _separate_file(path, data_name)
        if data is None:
            return
        offset = 0
    else:
        data, offset = path, end.end()
    skip = int(fields.get("byte skip", fields.get("byteskip", "0")) or 0)
    expected = math.prod(int(s) for s in fields["sizes"].split()) * _nrrd_type_size(fields["type"])
    available = _data_size(data, offset, encoding)
    _need(available if skip == -1 else available - skip, expected, data)


_MET_SIZES = {"CHAR": 1, "UCHAR": 1, "SHORT": 2, "USHORT": 2, "INT": 4, "UINT": 4, "LONG": 4, "ULONG": 4,
              "LONG_LONG": 8, "ULONG_LONG": 8, "FLOAT": 4, "DOUBLE": 8}


def check_metaimage(path: Path) -> None:
    """MetaImage (``.mha`` with ``ElementDataFile = LOCAL``, ``.mhd`` with a data file)."""
    with path.open("rb") as handle:
        head = handle.read(CHUNK)
    found = re.search(rb"ElementDataFile\s*=\s*([^\r\n]*)\r?\n", head)
    if found is None:
        raise Damaged("the header ends early")
    fields = _fields(head[: found.start()].decode("latin-1").splitlines(), "=")
    name = found.group(1).decode("latin-1").strip()
    if name.upper() == "LOCAL":
        data, offset = path, found.end()
    else:
        data, offset = _separate_file(path, name), 0
        if data is None:
            return
    size = _MET_SIZES.get(fields.get("elementtype", "").upper().removeprefix("MET_"), 0)
    channels = int(fields.get("elementnumberofchannels", "1") or 1)
    expected = math.prod(int(s) for s in fields.get("dimsize", "0").split()) * channels * size
    skip = int(fields.get("headersize", "0") or 0)
    if fields.get("compresseddata", "false").lower() == "true":
        compressed = int(fields.get("compresseddatasize", "0") or 0)
        _need(max(0, data.stat().st_size - offset), compressed, data)
        available = _data_size(data, offset, "zlib")
    else:
        available = _data_size(data, offset, "raw")
    _need(available if skip == -1 else available - max(skip, 0), expected, data)


def check_volume_file(path: Path) -> None:
    """Raise :class:`InputError` naming ``path`` when it is shorter than its header says or its
    compressed data is broken; other formats and problems are left to SimpleITK."""
    name = path.name.lower()
    check = (check_nifti if name.endswith((".nii", ".nii.gz")) else check_nrrd if name.endswith((".nrrd", ".nhdr"))
             else check_metaimage if name.endswith((".mha", ".mhd")) else None)
    if check is None:
        return
    try:
        check(path)
    except Damaged as damage:
        raise refusal(damage.file or path, str(damage), path) from None
    except (ValueError, struct.error):
        raise refusal(path, "its header cannot be read") from None


_LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def dicom_storage_class(path: Path) -> str | None:
    """The SOP class a DICOM file declares in its file meta group (always explicit VR little endian),
    or None when the file ends before that group does (or has no DICOM marker)."""
    with path.open("rb") as handle:
        head = handle.read(144)
        if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            return None
        meta = handle.read(struct.unpack("<I", head[140:144])[0])
    position = 0
    while position + 8 <= len(meta):
        tag, vr = meta[position:position + 4], meta[position + 4:position + 6]
        if vr in _LONG_VRS:
            start = position + 12
            length = struct.unpack("<I", meta[position + 8:start])[0] if start <= len(meta) else 0
        else:
            start = position + 8
            length = struct.unpack("<H", meta[position + 6:start])[0]
        if tag == b"\x02\x00\x02\x00" and start + length <= len(meta):
            return meta[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        position = start + length
    return None


def _looks_like_dicom(path: Path) -> bool:
    """A file named like a DICOM file, or carrying the DICOM marker ("DICM" at byte 128)."""
    if path.suffix.lower() in (".dcm", ".ima"):
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def check_dicom_folder(folder: Path, series_files: list[str], taken_files: set[str]) -> None:
    """Refuse a DICOM file in ``folder`` that GDCM left out of every series although it is an image of
    the same kind as ``series_files`` (GDCM skips, without an error, a slice it cannot parse), or that
    ends inside its file meta group. Other objects (dose reports, DICOMDIR) are left alone."""
    expected = dicom_storage_class(Path(series_files[0])) if series_files else None
    taken = {Path(f).resolve() for f in taken_files}
    for item in sorted(folder.iterdir()):
        if (not item.is_file() or item.resolve() in taken or item.name.upper() == "DICOMDIR"
                or not _looks_like_dicom(item)):
            continue
        storage_class = dicom_storage_class(item)
        if storage_class is None or storage_class == expected:
            raise refusal(item, "a DICOM file that cannot be parsed; the series would miss it")
