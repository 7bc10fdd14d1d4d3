"""``xaioverlay serve``'s refusals: one line naming the problem and the fix, exit 1, before any server starts."""

from __future__ import annotations

from xaioverlay.cli import main


def test_serve_refuses_a_missing_case_folder_in_one_line(tmp_path, capsys):
    assert main(["serve", "--cases", str(tmp_path / "missing"), "--port", "0"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "missing does not exist" in lines[0] and "folder of volumes" in lines[0]


def test_serve_refuses_multichannel_cases(tmp_path, capsys):
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,image,image_2\na,{tmp_path / 'a1.nrrd'},{tmp_path / 'a2.nrrd'}\n", encoding="utf-8")
    for name in ("a1.nrrd", "a2.nrrd"):
        (tmp_path / name).write_bytes(b"")
    assert main(["serve", "--cases", str(manifest), "--port", "0"]) == 1
    assert "single-volume cases" in capsys.readouterr().err


def test_serve_refuses_a_missing_or_incomplete_cohort_folder_in_one_line(tmp_path, capsys):
    def refusal(*args: str) -> str:
        assert main(["serve", *args, "--port", "0"]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "missing does not exist" in refusal("--cohort", str(tmp_path / "missing"))
    assert "holds no cohort.csv" in refusal("--cohort", str(tmp_path))
    (tmp_path / "cohort.csv").write_text("case_id,method,status\ncase_a,gxi,done\n", encoding="utf-8")
    (tmp_path / "similar_cases.csv").write_text("case_id,rank,similar_case_id,cosine_similarity\n", encoding="utf-8")
    (tmp_path / "cases" / "case_a").mkdir(parents=True)  # no checksums.json: never published
    line = refusal("--cohort", str(tmp_path))
    assert "case_a missing or incomplete" in line and "--resume" in line
