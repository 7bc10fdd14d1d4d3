"""First-use installation: what is missing, in what order, through which installer, only after asking.

The installers are Slicer's (``slicer.util.pip_install``, SlicerPyTorch's ``installTorch``) and cannot
run here; the recorders below stand in for them and only note what they were asked to install.
"""

from __future__ import annotations

from XAIOverlayLib import dependencies


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


def test_nothing_to_do_asks_nothing():
    plan = dependencies.plan_install(installed("torch", "monai", "SimpleITK", "nibabel", "yaml"))
    recorder = Recorder()
    assert plan.empty and dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip) is True
    assert recorder.calls == []


def test_torch_through_the_pytorch_extension_then_the_rest_with_pip():
    plan = dependencies.plan_install(installed("SimpleITK"), pytorch_extension=True)
    recorder = Recorder()
    assert dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip,
                                install_torch_with_extension=recorder.torch_extension)
    assert [call[0] for call in recorder.calls] == ["ask", "PyTorchUtils", "pip"]
    assert "matched to your GPU driver" in recorder.calls[0][1]
    assert recorder.calls[2] == ("pip", ("monai>=1.3", "nibabel>=5", "PyYAML>=6"))


def test_without_the_extension_torch_comes_from_pip_after_asking():
    plan = dependencies.plan_install(installed("monai", "SimpleITK", "nibabel", "yaml"), pytorch_extension=False)
    recorder = Recorder()
    assert dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip)
    assert recorder.calls[0][0] == "ask" and recorder.calls[1] == ("pip", ("torch>=2.1",))


def test_declining_installs_nothing():
    plan = dependencies.plan_install(installed(), pytorch_extension=False)
    recorder = Recorder(answer=False)
    assert dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip) is False
    assert [call[0] for call in recorder.calls] == ["ask"]


def test_a_failed_pytorch_extension_install_stops_before_pip():
    plan = dependencies.plan_install(installed("SimpleITK", "nibabel", "yaml"), pytorch_extension=True)
    recorder = Recorder(torch_ok=False)
    assert dependencies.install(plan, confirm=recorder.confirm, pip_install=recorder.pip,
                                install_torch_with_extension=recorder.torch_extension) is False
    assert ("pip", ("monai>=1.3",)) not in recorder.calls


def test_presence_is_checked_without_importing():
    import sys

    assert "this" not in sys.modules  # the standard library's Zen module: importing it prints
    assert dependencies.is_installed("this") and "this" not in sys.modules
    assert not dependencies.is_installed("surely_not_a_package_xaioverlay")
