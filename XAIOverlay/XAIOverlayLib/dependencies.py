"""The engine's Python packages, installed into Slicer's Python on first use — never at import.

PyTorch comes first and the right build matters (CUDA version vs. driver): when the PyTorch extension
(SlicerPyTorch, module ``PyTorchUtils``) is installed, its logic picks and installs a build that
matches the GPU driver; otherwise the user is asked, then ``pip`` installs the default build. The
packages the engine imports that Slicer may lack (MONAI, SimpleITK, PyYAML, psutil), and einops,
which MONAI's transformer networks (UNETR, SwinUNETR, ViT) import, follow in one ``pip`` call, after
one question.

The installed PyTorch is never replaced: every ``pip`` call names the installed ``torch`` (and
``numpy``, which Slicer ships) at their exact versions — a CUDA build's ``2.5.1+cu121`` included — so
pip can only keep them, and MONAI is asked for in the range of releases that support that PyTorch.
Where none does, nothing is installed and the user gets one line saying what to update.

Installers, the question and the version lookup are passed in, so this runs without Slicer: the
module passes ``slicer.util.pip_install``, ``slicer.util.confirmOkCancelDisplay`` and ``PyTorchUtilsLogic``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable

#: The PyTorch the engine needs (PyTorchUtils and pip get this requirement when PyTorch is missing).
TORCH_REQUIREMENT = ">=2.1"
MINIMUM_TORCH = (2, 1, 0)
#: Newest MONAI line first: (the oldest torch its releases accept, the requirement). From each release's
#: package metadata (Requires-Dist): 1.6.x torch>=2.8.0; 1.5.1-1.5.2 torch>=2.4.1 (1.5.0 also <2.7);
#: 1.3.x-1.4.0 torch>=1.9 (the engine needs MONAI >= 1.3).
MONAI_FOR_TORCH = (
    ((2, 8, 0), "monai>=1.6,<2"),
    ((2, 4, 1), "monai>=1.5.1,<1.6"),
    ((1, 9, 0), "monai>=1.3,<1.5"),
)
#: (import name, pip requirement) of what the engine imports and Slicer may lack, in installation
#: order; MONAI's requirement depends on the installed torch. numpy ships with Slicer; matplotlib is
#: imported only by the command line's montage and report, never on the module's path. einops is not
#: imported by the engine itself: MONAI's transformer blocks import it (without it they fail to build).
PACKAGES = (
    ("monai", None),
    ("SimpleITK", "SimpleITK>=2.3"),
    ("yaml", "PyYAML>=6"),
    ("psutil", "psutil>=5.8"),
    ("einops", "einops>=0.6"),
)
#: Distributions kept at their installed version by every pip call.
KEPT = ("torch", "numpy")


class DependencyError(RuntimeError):
    """No installation can work with what is installed (e.g. a PyTorch too old for any MONAI)."""


def is_installed(name: str) -> bool:
    """True when ``name`` can be imported (checked without importing it)."""
    return importlib.util.find_spec(name) is not None


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (as pip sees it, e.g. ``2.5.1+cu121``), or None."""
    importlib.invalidate_caches()
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, int, int, int]:
    """``2.5.1+cu121`` → (2, 5, 1, 1); a pre-release (``2.8.0a0``, ``2.9.0.dev20250101``) sorts below its
    release: (2, 8, 0, 0). The last number is 1 for a final release."""
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?(.*)", version)
    if not match:
        raise DependencyError(f"cannot read the installed PyTorch version {version!r}; reinstall PyTorch and retry")
    rest = match.group(4).split("+")[0].lower()
    pre = bool(re.match(r"\.?(a|b|rc|c|alpha|beta|pre|preview|dev)", rest))
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0), 0 if pre else 1


def monai_requirement(torch_version: str) -> str:
    """The MONAI releases that support ``torch_version``, as a pip requirement (DependencyError if none)."""
    found = release(torch_version)
    if found < (*MINIMUM_TORCH, 1):
        raise DependencyError(
            f"PyTorch {torch_version} is too old for XAIOverlay (it needs torch{TORCH_REQUIREMENT} and a MONAI that "
            "supports it); update PyTorch (in the PyTorch extension: uninstall, restart Slicer, install) and retry"
        )
    return next(requirement for oldest, requirement in MONAI_FOR_TORCH if found >= (*oldest, 1))


def kept_pins(versions: Callable[[str], str | None]) -> list[str]:
    """``torch==<installed>``, ``numpy==<installed>`` for what is installed: pip may not replace them."""
    return [f"{name}=={version}" for name in KEPT if (version := versions(name))]


def pip_arguments(missing: list[str], versions: Callable[[str], str | None]) -> list[str]:
    """The one pip call installing the import names ``missing`` next to the installed torch."""
    torch_version = versions("torch")
    if torch_version is None:  # importable, but pip does not know it (a source build): pip could replace it
        raise DependencyError(
            "the installed PyTorch has no package metadata, so pip cannot be told to keep it; install "
            f"{', '.join(dict(PACKAGES)[name] or 'monai>=1.3' for name in missing)} yourself and retry"
        )
    requirements = dict(PACKAGES)
    chosen = [requirements[name] or monai_requirement(torch_version) for name in missing]
    return chosen + kept_pins(versions)


@dataclass
class InstallPlan:
    """What is missing and how it would be installed."""

    torch: str | None = None  # None (present), "PyTorchUtils" or "pip"
    missing: list[str] = field(default_factory=list)  # import names from PACKAGES

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.missing

    def describe(self) -> str:
        parts = []
        if self.torch == "PyTorchUtils":
            parts.append("PyTorch (through the PyTorch extension, matched to your GPU driver)")
        elif self.torch == "pip":
            parts.append(f"PyTorch (torch{TORCH_REQUIREMENT}, default build from PyPI; install the PyTorch extension for a build matched to your GPU)")
        names = {"monai": "MONAI (a release that supports your PyTorch)", "yaml": "PyYAML"}
        parts += [names.get(name, name) for name in self.missing]
        return ", ".join(parts)


def plan_install(installed: Callable[[str], bool] = is_installed, pytorch_extension: bool = False) -> InstallPlan:
    """The installation needed now."""
    torch = None if installed("torch") else ("PyTorchUtils" if pytorch_extension else "pip")
    return InstallPlan(torch, [name for name, _ in PACKAGES if not installed(name)])


def install(
    plan: InstallPlan,
    *,
    confirm: Callable[[str], bool],
    pip_install: Callable[[list[str]], None],
    install_torch_with_extension: Callable[[], bool] | None = None,
    versions: Callable[[str], str | None] = installed_version,
) -> bool:
    """Carry out ``plan``; False if the user declined (nothing installed then).

    With the PyTorch extension, its own installer asks about PyTorch; we ask once for the rest. With
    PyTorch already installed, a PyTorch no MONAI supports is refused (DependencyError) before asking.
    """
    if plan.empty:
        return True
    if plan.torch is None:
        pip_arguments(plan.missing, versions)  # refuse now, before asking, if nothing can work
    if (plan.torch == "pip" or plan.missing) and not confirm(
        "XAIOverlay needs Python packages that are not installed yet: " + plan.describe()
        + ". Install them now? This downloads them once and can take several minutes. An installed PyTorch is kept."
    ):
        return False
    if plan.torch == "PyTorchUtils":
        if install_torch_with_extension is None or not install_torch_with_extension():
            return False
    elif plan.torch == "pip":
        pip_install([f"torch{TORCH_REQUIREMENT}", *kept_pins(lambda name: None if name == "torch" else versions(name))])
    if plan.missing:
        pip_install(pip_arguments(plan.missing, versions))
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
