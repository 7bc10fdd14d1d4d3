"""The engine's Python packages, installed into Slicer's Python on first use — never at import.

PyTorch comes first and the right build matters (CUDA version vs. driver): when the PyTorch extension
(SlicerPyTorch, module ``PyTorchUtils``) is installed, its logic picks and installs a build that
matches the GPU driver; otherwise the user is asked, then ``pip`` installs the default build. MONAI,
SimpleITK, NiBabel and PyYAML follow with ``pip`` if missing (one question for all of them).

Installers and the question are passed in, so this runs without Slicer: the module passes
``slicer.util.pip_install``, ``slicer.util.confirmOkCancelDisplay`` and ``PyTorchUtilsLogic``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable

#: (import name, pip requirement), in installation order; torch is handled separately.
TORCH_REQUIREMENT = ">=2.1"
PACKAGES = (
    ("monai", "monai>=1.3"),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("nibabel", "nibabel>=5"),
    ("yaml", "PyYAML>=6"),
)


def is_installed(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


@dataclass
class InstallPlan:
    """What is missing and how it would be installed."""

    torch: str | None = None  # None (present), "PyTorchUtils" or "pip"
    pip: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.pip

    def describe(self) -> str:
        parts = []
        if self.torch == "PyTorchUtils":
            parts.append("PyTorch (through the PyTorch extension, matched to your GPU driver)")
        elif self.torch == "pip":
            parts.append(f"PyTorch (torch{TORCH_REQUIREMENT}, default build from PyPI; install the PyTorch extension for a build matched to your GPU)")
        parts += self.pip
        return ", ".join(parts)


def plan_install(installed: Callable[[str], bool] = is_installed, pytorch_extension: bool = False) -> InstallPlan:
    """The installation needed now."""
    torch = None if installed("torch") else ("PyTorchUtils" if pytorch_extension else "pip")
    return InstallPlan(torch, [requirement for name, requirement in PACKAGES if not installed(name)])


def install(
    plan: InstallPlan,
    *,
    confirm: Callable[[str], bool],
    pip_install: Callable[[list[str]], None],
    install_torch_with_extension: Callable[[], bool] | None = None,
) -> bool:
    """Carry out ``plan``; False if the user declined (nothing installed then).

    With the PyTorch extension, its own installer asks about PyTorch; we ask once for the rest.
    """
    if plan.empty:
        return True
    rest = [part for part in [("PyTorch" if plan.torch == "pip" else None), *plan.pip] if part]
    if rest and not confirm(
        "XAIOverlay needs Python packages that are not installed yet: " + plan.describe()
        + ". Install them now? This downloads them once and can take several minutes."
    ):
        return False
    if plan.torch == "PyTorchUtils":
        if install_torch_with_extension is None or not install_torch_with_extension():
            return False
    elif plan.torch == "pip":
        pip_install([f"torch{TORCH_REQUIREMENT}"])
    if plan.pip:
        pip_install(list(plan.pip))
    return True


def ensure_in_slicer() -> bool:
    """In Slicer: install what is missing, asking the user first; False if they declined."""
    import slicer.util

    plan = plan_install(pytorch_extension=is_installed("PyTorchUtils"))

    def torch_with_extension() -> bool:
        import PyTorchUtils

        logic = PyTorchUtils.PyTorchUtilsLogic()
        return logic.installTorch(askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT) is not None

    return install(plan, confirm=slicer.util.confirmOkCancelDisplay, pip_install=slicer.util.pip_install,
                   install_torch_with_extension=torch_with_extension)
