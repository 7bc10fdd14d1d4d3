"""Bad manifests and cohort folders are refused in one line before any work is scheduled; good ones read as written."""

from __future__ import annotations

import os

import pytest

from xaioverlay.cohort import CaseSettings, run_cohort
from xaioverlay.cohort.command import progress_line
from xaioverlay.cohort.manifest import read_cases
from xaioverlay.cohort.run import check_settings
from xaioverlay.errors import InputError

BAD_MANIFESTS = {
    "no_image_column": ("case_id,file\na,a.nrrd\n", "no column image"),
    "no_case_id_column": ("id,image\na,a.nrrd\n", "no column case_id"),
    "duplicate_case_id": ("case_id,image\na,a.nrrd\nb,b.nrrd\na,c.nrrd\n", "case id 'a' on lines 2 and 4"),
    "short_row": ("case_id,image,label\na,a.nrrd\n", "line 2: 2 fields where the header has 3"),
    "empty_image": ("case_id,image\na,\n", "case 'a' has no image"),
    "channels_not_consecutive": ("case_id,image,image_3\na,a.nrrd,c.nrrd\n", "not consecutive"),
    "case_id_not_a_folder_name": ("case_id,image\n../escape,a.nrrd\n", "cannot name a folder"),
    "header_only": ("case_id,image\n", "no case"),
    "empty_file": ("", "is empty"),
}


@pytest.mark.parametrize("name", BAD_MANIFESTS)
def test_bad_manifest_refused_in_one_line_before_any_work(tmp_path, name):
    text, expected = BAD_MANIFESTS[name]
    manifest = tmp_path / "cases.csv"
    manifest.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(InputError) as error:
        run_cohort(manifest, CaseSettings(model=str(tmp_path)), out, scheduler="tcp://127.0.0.1:1")
    message = str(error.value)
    assert expected in message and "\n" not in message and str(manifest) in message
    assert not out.exists(), "refused before the output folder was made, so before any work"


def test_unreadable_manifest_refused(tmp_path):
    manifest = tmp_path / "cases.csv"
    manifest.write_bytes(b"case_id,image\n\xff\xfe\x00binary\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_cases(manifest)
    with pytest.raises(InputError, match="does not exist"):
        read_cases(tmp_path / "missing.csv")


def test_folder_without_volumes_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a volume")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.nrrd").write_text("volumes in subfolders are not cases")
    with pytest.raises(InputError, match="holds no volume"):
        read_cases(tmp_path)


def test_folder_makes_one_case_per_volume_named_without_its_extension(tmp_path):
    for name in ("b.nii.gz", "a.nrrd", "c.mha", "readme.txt"):
        (tmp_path / name).write_bytes(b"")
    cases = read_cases(tmp_path)
    assert [(c.case_id, os.path.basename(c.images[0])) for c in cases] == [
        ("a", "a.nrrd"), ("b", "b.nii.gz"), ("c", "c.mha")]
    (tmp_path / "a.nii").write_bytes(b"")
    with pytest.raises(InputError, match="are both case 'a'"):
        read_cases(tmp_path)


def test_manifest_channels_in_order_paths_relative_to_the_manifest(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    manifest = folder / "cases.csv"
    manifest.write_text("image_3,label,image,case_id,image_2,reference_mask\n"
                        f"t2.nrrd,1,t1.nrrd,p1,{tmp_path / 'abs.nrrd'},m.nrrd\n"
                        "u2.nrrd,,u1.nrrd,p2,v.nrrd,\n")
    first, second = read_cases(manifest)
    assert first.case_id == "p1" and first.label == "1"
    assert first.images == (str(folder / "t1.nrrd"), str(tmp_path / "abs.nrrd"), str(folder / "t2.nrrd"))
    assert first.reference_mask == str(folder / "m.nrrd")
    assert second.label is None and second.reference_mask is None


def test_paths_are_absolute_when_the_manifest_or_folder_is_named_relative_to_the_working_directory(tmp_path,
                                                                                                   monkeypatch):
    """The cohort table keeps these paths: relative ones would only resolve from the directory the run began in
    (``serve --cohort`` elsewhere then found no image)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "cases.csv").write_text("case_id,image,reference_mask\np1,t1.nrrd,m.nrrd\n")
    (folder / "a.nrrd").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    (case,) = read_cases("data/cases.csv")
    assert case.images == (str(folder / "t1.nrrd"),) and case.reference_mask == str(folder / "m.nrrd")
    (case,) = read_cases("data")
    assert case.images == (str(folder / "a.nrrd"),)


def test_second_run_in_a_cohort_folder_needs_resume_with_the_same_settings(tmp_path):
    first = CaseSettings(model=str(tmp_path), methods="gxi")
    check_settings(tmp_path, first, resume=False)
    with pytest.raises(InputError, match="already holds a cohort; add --resume"):
        check_settings(tmp_path, first, resume=False)
    check_settings(tmp_path, first, resume=True)
    with pytest.raises(InputError, match=r"other settings \(methods\)"):
        check_settings(tmp_path, CaseSettings(model=str(tmp_path), methods="gxi,gradcam"), resume=True)


def test_progress_line_shows_counts_rate_and_eta():
    event = {"event": "cohort", "case_id": "c7", "status": "failed", "done": 11, "failed": 1, "remaining": 28,
             "total": 40, "cases_per_minute": 4.1, "eta_s": 409.0}
    assert progress_line(event) == ("12/40 cases · 11 done · 1 failed · 28 remaining · 4.1 cases/min · ETA 6.8 min"
                                    " · c7 failed")


def test_missing_model_refused_before_any_work(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="--model .*nowhere does not exist"):
        run_cohort(tmp_path, CaseSettings(model=str(tmp_path / "nowhere")), out)
    assert not out.exists()
