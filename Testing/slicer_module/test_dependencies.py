"""First-use installation: what is missing, in what order, through which installer, only after asking;
the exact pip arguments for several installed PyTorch builds (never replaced), and a PyTorch too old refused.

The installers are Slicer's (``slicer.util.pip_install``, SlicerPyTorch's ``installTorch``) and cannot
run here; the recorders below stand in for them and only note what they were asked to install.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from XAIOverlayLib import dependencies

MODULE = Path(__file__).resolve().parents[2] / "XAIOverlay"
SOURCES = [MODULE / "XAIOverlay.py", *sorted((MODULE / "xaioverlay").rglob("*.py")),
           *sorted((MODULE / "XAIOverlayLib").rglob("*.py"))]


class Recorder:
    """Stands in for Slicer's installers: records calls, installs nothing."""

    def __init__(self, answer: bool = True, torch_ok: bool = True) -> None:
        self.calls: list[tuple] = []
        self.answer = answer
        self.torch_ok = torch_ok

    def confirm(self, text: str) -> bool:
        self.calls.append(("ask", text))
        return self.answer

    def pip(self, requirements: list[str]) -> None:
        self.calls.append(("pip", tuple(requirements)))

    def torch_extension(self) -> bool:
        self.calls.append(("PyTorchUtils",))
        return self.torch_ok


def installed(*names):
    return lambda name: name in names


def versions(**installed_versions):
    """Stands in for the installed distributions' metadata: name → version."""
    return lambda name: installed_versions.get(name)


EVERYTHING = ("torch", "monai", "SimpleITK", "yaml", "psutil", "einops")


def run_install(plan, recorder, **kwargs):
    return dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip,
                                install_torch_with_extension=recorder.torch_extension, **kwargs)


def test_nothing_to_do_asks_nothing():
    plan = dependencies.plan_install(installed(*EVERYTHING))
    recorder = Recorder()
    assert plan.empty and run_install(plan, recorder) is True
    assert recorder.calls == []


@pytest.mark.parametrize("torch_version, monai", [
    ("2.13.0", "monai>=1.6,<2"),
    ("2.8.0", "monai>=1.6,<2"),
    ("2.8.0a0+5228986c39.nv25.05", "monai>=1.5.1,<1.6"),  # a pre-release 2.8 does not meet MONAI 1.6's torch>=2.8.0
    ("2.5.1+cu121", "monai>=1.5.1,<1.6"),
    ("2.4.1", "monai>=1.5.1,<1.6"),
    ("2.4.0", "monai>=1.3,<1.5"),
    ("2.1.2+cpu", "monai>=1.3,<1.5"),
])
def test_one_pip_call_pins_the_installed_torch_exactly_and_asks_for_a_monai_that_supports_it(torch_version, monai):
    plan = dependencies.plan_install(installed("torch", "SimpleITK"))
    recorder = Recorder()
    assert run_install(plan, recorder, versions=versions(torch=torch_version, numpy="2.1.3"))
    assert recorder.calls[1:] == [
        ("pip", (monai, "PyYAML>=6", "psutil>=5.8", "einops>=0.6", f"torch=={torch_version}", "numpy==2.1.3")),
    ]
    assert recorder.calls[0][0] == "ask" and "An installed PyTorch is kept" in recorder.calls[0][1]


@pytest.mark.parametrize("torch_version", ["1.13.1", "2.0.1+cu118", "2.1.0rc1"])
def test_a_torch_too_old_for_any_monai_is_refused_in_one_line_before_asking(torch_version):
    plan = dependencies.plan_install(installed("torch", "SimpleITK", "yaml", "psutil"))
    recorder = Recorder()
    with pytest.raises(dependencies.DependencyError) as refused:
        run_install(plan, recorder, versions=versions(torch=torch_version, numpy="1.26.4"))
    message = str(refused.value)
    assert f"PyTorch {torch_version} is too old" in message and "torch>=2.1" in message and "\n" not in message
    assert recorder.calls == []


def test_torch_through_the_pytorch_extension_then_the_rest_pinned_to_the_build_it_installed():
    plan = dependencies.plan_install(installed("SimpleITK"), pytorch_extension=True)
    recorder = Recorder()
    state = {}

    def torch_extension():
        state["torch"] = "2.6.0+cu124"  # what the extension installed, matched to the driver
        return recorder.torch_extension()

    assert dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip,
                                install_torch_with_extension=torch_extension,
                                versions=lambda name: state.get(name) or {"numpy": "1.26.4"}.get(name))
    assert [call[0] for call in recorder.calls] == ["ask", "PyTorchUtils", "pip"]
    assert "matched to your GPU driver" in recorder.calls[0][1]
    assert recorder.calls[2] == ("pip", ("monai>=1.5.1,<1.6", "PyYAML>=6", "psutil>=5.8",
                                         "einops>=0.6", "torch==2.6.0+cu124", "numpy==1.26.4"))


def test_without_the_extension_torch_comes_from_pip_after_asking_and_numpy_is_kept():
    plan = dependencies.plan_install(installed(*EVERYTHING[1:]), pytorch_extension=False)
    recorder = Recorder()
    assert run_install(plan, recorder, versions=versions(numpy="2.1.3"))
    assert recorder.calls[0][0] == "ask" and recorder.calls[1:] == [("pip", ("torch>=2.1", "numpy==2.1.3"))]


def test_declining_installs_nothing():
    plan = dependencies.plan_install(installed(), pytorch_extension=False)
    recorder = Recorder(answer=False)
    assert run_install(plan, recorder) is False
    assert [call[0] for call in recorder.calls] == ["ask"]


def test_a_failed_pytorch_extension_install_stops_before_pip():
    plan = dependencies.plan_install(installed("SimpleITK", "yaml", "psutil"), pytorch_extension=True)
    recorder = Recorder(torch_ok=False)
    assert run_install(plan, recorder) is False
    assert [call[0] for call in recorder.calls] == ["ask", "PyTorchUtils"]


def test_einops_is_installed_for_monai_transformer_networks_when_missing():
    plan = dependencies.plan_install(installed("torch", "monai", "SimpleITK", "yaml", "psutil"))
    recorder = Recorder()
    assert plan.missing == ["einops"]
    assert run_install(plan, recorder, versions=versions(torch="2.13.0", numpy="2.1.3"))
    assert recorder.calls[1:] == [("pip", ("einops>=0.6", "torch==2.13.0", "numpy==2.1.3"))]


def test_presence_is_checked_without_importing():
    assert "this" not in sys.modules  # the standard library's Zen module: importing it prints
    assert dependencies.is_installed("this") and "this" not in sys.modules
    assert not dependencies.is_installed("surely_not_a_package_xaioverlay")


def test_the_installed_torch_version_is_read_as_pip_sees_it():
    import torch

    assert dependencies.installed_version("torch") == torch.__version__
    assert dependencies.installed_version("surely_not_a_package_xaioverlay") is None


def third_party_imports() -> set[str]:
    """Top-level packages imported anywhere in the engine, the module library and the module file."""
    roots = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    return roots - set(sys.stdlib_module_names) - {"__future__", "xaioverlay", "XAIOverlayLib", "XAIOverlay"}


def test_what_is_installed_is_exactly_what_the_code_imports_and_slicer_lacks():
    # einops: imported by MONAI's transformer blocks (UNETR, SwinUNETR, ViT), not by our code
    installs = {"torch"} | {name for name, _ in dependencies.PACKAGES} - {"einops"}
    slicer_ships = {"slicer", "qt", "ctk", "vtk", "numpy"}
    optional = {"PyTorchUtils"}  # the PyTorch extension, used when present
    # montage and report of the CLI, and `xaioverlay cohort` (the `cohort` extra); never imported on the module's path
    command_line_only = {"matplotlib", "distributed", "pyarrow"}
    # nnU-Net folders only, imported when one is loaded; a missing one is named in one line (README, nnU-Net)
    nnunet_only = {"dynamic_network_architectures", "scipy", "skimage"}
    imported = third_party_imports()
    assert installs <= imported, f"installed but never imported: {sorted(installs - imported)}"
    unexpected = imported - installs - slicer_ships - optional - command_line_only - nnunet_only
    assert not unexpected, f"imported but neither installed nor shipped with Slicer: {sorted(unexpected)}"


def test_a_torch_pip_does_not_know_is_not_risked():
    plan = dependencies.plan_install(installed("torch", "SimpleITK", "psutil", "einops"))
    recorder = Recorder()
    with pytest.raises(dependencies.DependencyError, match="no package metadata.*monai>=1.3, PyYAML>=6 yourself"):
        run_install(plan, recorder, versions=versions(numpy="2.1.3"))
    assert recorder.calls == []
