"""Static checks of the Slicer module (its Qt GUI cannot run here): the widget code and the .ui agree,
every parameter is bound to a widget, the module file imports only what Slicer has, the CMake lists
name every script and resource, the catalog entry and icons are valid."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "XAIOverlay"
MODULE_FILE = MODULE / "XAIOverlay.py"
UI_FILE = MODULE / "Resources" / "UI" / "XAIOverlay.ui"
#: Modules a Slicer ≥ 5.10 install provides to a scripted module at import time (its Python's standard
#: library plus Slicer's own bindings). torch, monai and the engine are not among them.
SLICER_PROVIDES = {"qt", "ctk", "vtk", "slicer", "enum", "pathlib", "typing", "os", "logging", "json", "time", "unittest"}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).iter("widget")}


def parameter_class() -> ast.ClassDef:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return node
    raise AssertionError("no @parameterNodeWrapper class in XAIOverlay.py")


def test_every_ui_name_the_code_uses_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = used - set(ui_widgets())
    assert used and not missing, f"used in XAIOverlay.py but not in the .ui: {sorted(missing)}"


def test_every_parameter_is_bound_to_exactly_one_widget_and_every_binding_to_a_parameter():
    parameters = [item.target.id for item in parameter_class().body if isinstance(item, ast.AnnAssign)]
    bindings = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bindings.setdefault(prop.find("string").text, []).append(name)
    assert len(parameters) > 15
    unbound = [p for p in parameters if p not in bindings]
    assert not unbound, f"parameters without a widget (SlicerParameterName): {unbound}"
    assert all(len(widgets) == 1 for widgets in bindings.values()), bindings
    assert set(bindings) <= set(parameters), f"widgets bound to no parameter: {set(bindings) - set(parameters)}"


def test_bound_widgets_are_of_a_kind_the_parameter_wrapper_connects():
    """The connector Slicer picks depends on the widget class and the parameter's type."""
    kinds = {"vtkMRML": {"qMRMLNodeComboBox"}, "Path": {"ctkPathLineEdit"}, "str": {"QLineEdit"}, "bool": {"QCheckBox"},
             "float": {"ctkSliderWidget"}, "enum": {"QComboBox"}}
    enums = {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)
             and any(getattr(b, "attr", getattr(b, "id", "")) == "Enum" for b in node.bases)}
    widgets = ui_widgets()
    for item in parameter_class().body:
        if not isinstance(item, ast.AnnAssign):
            continue
        annotation = ast.unparse(item.annotation)
        kind = ("vtkMRML" if "vtkMRML" in annotation else "Path" if "Path" in annotation else "float" if "float" in annotation
                else "enum" if annotation in enums else annotation)
        widget = next(w for w in widgets.values() if any(p.get("name") == "SlicerParameterName" and p.find("string").text == item.target.id
                                                         for p in w.findall("property")))
        assert widget.get("class") in kinds[kind], (item.target.id, annotation, widget.get("class"))


def test_the_module_file_imports_only_what_slicer_provides_at_top_level():
    imported = set()
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= SLICER_PROVIDES, imported - SLICER_PROVIDES


def test_the_slicer_side_library_imports_no_heavy_package_at_import_time():
    """Importing XAIOverlayLib (what the module does on first use) must not pull in torch or MONAI."""
    code = ("import sys; import XAIOverlayLib.logic, XAIOverlayLib.dependencies, XAIOverlayLib.cases;"
            "heavy = sorted(m for m in ('torch', 'monai', 'SimpleITK', 'matplotlib') if m in sys.modules); print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=MODULE, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_module_follows_slicers_template():
    classes = {node.name: [ast.unparse(b) for b in node.bases] for node in module_tree().body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["XAIOverlay"]
    assert "ScriptedLoadableModuleWidget" in classes["XAIOverlayWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["XAIOverlayLogic"]
    assert "ScriptedLoadableModuleTest" in classes["XAIOverlayTest"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "connectGui(self.ui)" in source and "tryWithErrorDisplay" in source


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return [entry.replace("${MODULE_NAME}", "XAIOverlay") for entry in match.group(1).split() if not entry.startswith("#")]


def test_cmake_lists_every_script_and_resource_and_nothing_missing():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    bundles = cmake_list(text, "MODULE_DEMO_BUNDLE_FILES")
    on_disk = sorted(str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts and p.parts[len(MODULE.parts)] != "Testing")
    assert sorted(scripts) == on_disk
    resource_files = sorted(str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*") if p.is_file())
    assert sorted(resources) == resource_files
    bundle_root = ROOT / "Resources" / "bundles"
    bundle_files = sorted(str(p.relative_to(bundle_root)) for p in bundle_root.rglob("*") if p.is_file()) if bundle_root.is_dir() else []
    assert sorted(bundles) == bundle_files
    assert "WITH_GENERIC_TESTS" in text and "slicerMacroBuildScriptedModule" in text and "add_subdirectory(Testing)" in text
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"^slicer_add_python_unittest\(SCRIPT .*\$\{MODULE_NAME\}\.py\)", testing, re.M)


#: A stand-in for a Slicer build tree (which cannot be built here): the macros the extension calls do
#: nothing, and the packaging step records the extension description Slicer would generate.
FAKE_SLICER = {
    "SlicerConfig.cmake": "set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)\n"
                          "set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)\n"
                          "set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Describe.cmake)\n"
                          "set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/qt-scripted-modules)\n",
    "UseSlicer.cmake": "macro(slicerMacroBuildScriptedModule)\nendmacro()\n"
                       "macro(slicer_add_python_unittest)\nendmacro()\n",
    "Nothing.cmake": "",
    "Describe.cmake": 'file(WRITE ${CMAKE_BINARY_DIR}/description.json "{\\"homepage\\": \\"${EXTENSION_HOMEPAGE}\\", '
                      '\\"icon\\": \\"${EXTENSION_ICONURL}\\", '
                      '\\"screenshots\\": \\"${EXTENSION_SCREENSHOTURLS}\\"}")\n',
}


def configure_extension(tmp_path, *options):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    fake = tmp_path / "fake-slicer"
    fake.mkdir(parents=True)
    for name, text in FAKE_SLICER.items():
        (fake / name).write_text(text, encoding="utf-8")
    build = tmp_path / "build"
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}", *options],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    description = json.loads((build / "description.json").read_text(encoding="utf-8"))
    return description, json.loads((build / "XAIOverlay.json").read_text(encoding="utf-8")), result.stderr


def test_the_published_address_is_one_build_variable_with_a_warning_while_unset(tmp_path):
    description, entry, warnings = configure_extension(tmp_path / "default")
    assert description["homepage"].endswith(".invalid/XAIOverlay") and "XAIOVERLAY_HOMEPAGE is not set" in warnings
    address = "https://github.com/someone/XAIOverlay"
    description, entry, warnings = configure_extension(tmp_path / "set", f"-DXAIOVERLAY_HOMEPAGE={address}")
    assert "XAIOVERLAY_HOMEPAGE" not in warnings
    assert description == {"homepage": address, "icon": f"{address}/raw/main/XAIOverlay.png",
                           "screenshots": f"{address}/raw/main/Docs/screenshots/compare.png"}
    assert entry["scm_url"] == f"{address}.git"
    assert (ROOT / "XAIOverlay.png").is_file() and (ROOT / "Docs" / "screenshots" / "compare.png").is_file()


def test_extension_cmake_and_catalog_entry(tmp_path):
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                  "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf'set\({field} "[^"]+"\)', text), field
    assert "add_subdirectory(XAIOverlay)" in text
    entry = configure_extension(tmp_path)[1]
    # slicer-extension-catalog-entry-schema v1.0.1: required keys, no others, types
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert isinstance(entry["build_dependencies"], list) and 1 <= entry["tier"] <= 5
    assert entry["category"] == re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', text).group(1)


@pytest.mark.parametrize("icon", [ROOT / "XAIOverlay.png", MODULE / "Resources" / "Icons" / "XAIOverlay.png"])
def test_icons_are_128_pixel_pngs(icon):
    data = icon.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (128, 128)


def test_the_logic_reads_only_parameters_the_wrapper_declares():
    """request_from_parameters on an object holding exactly the declared parameters (an unknown name
    would raise AttributeError); enums stand in by their values, as the wrapper hands them over."""
    import types

    from XAIOverlayLib.logic import request_from_parameters

    defaults = {"methods": "gradcam, hirescam", "targetClass": "tumour", "camLayer": "", "segments": " slic:64 ",
                "targetSegment": "",
                "targetRadius": 4.0, "measureQuality": True, "modelPath": Path("/models/net.yaml")}
    enums = {"device": "cpu", "score": "probability", "targetRegion": "roi", "orientation": "Axial"}
    values = {}
    for item in parameter_class().body:
        if isinstance(item, ast.AnnAssign):
            name = item.target.id
            values[name] = types.SimpleNamespace(value=enums[name]) if name in enums else defaults.get(name)
    request = request_from_parameters(types.SimpleNamespace(**values))
    assert request.methods == ["gradcam", "hirescam"] and request.volumes == []
    assert (request.model, request.score, request.device, request.evaluate) == ("/models/net.yaml", "probability", "cpu", True)
    assert (request.target.key, request.target.region, request.target.radius_mm) == ("tumour", "roi", 4.0)
    assert request.segments == "slic:64"
    values["modelPath"] = Path()  # what the wrapper holds before a model is chosen
    with pytest.raises(ValueError, match="choose a model first"):
        request_from_parameters(types.SimpleNamespace(**values))


def test_a_bundle_folder_can_be_chosen_beside_the_path_fields_file_browser():
    """A MONAI bundle is a folder, and ctkPathLineEdit's browse button opens a file dialog when files are
    allowed: a button beside it opens a folder dialog and sets the model path."""
    layout = next(item for item in ET.parse(UI_FILE).iter("layout") if item.get("name") == "modelPathLayout")
    assert [w.get("name") for w in layout.iter("widget")] == ["modelPathLineEdit", "modelFolderButton"]
    handler = next(node for node in ast.walk(module_tree())
                   if isinstance(node, ast.FunctionDef) and node.name == "onChooseModelFolder")
    body = ast.unparse(handler)
    assert "QFileDialog.getExistingDirectory" in body and "modelPath =" in body
    connection = 'self.ui.modelFolderButton.connect("clicked(bool)", self.onChooseModelFolder)'
    assert connection in MODULE_FILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("picked", ["configs/inference.json", "configs/metadata.json", "models/model.pt", "."])
def test_a_file_picked_inside_a_bundle_reaches_the_worker_as_the_bundle(picked):
    import types

    from XAIOverlayLib.logic import model_path

    bundle = ROOT / "Resources" / "bundles" / "tumour_classifier"
    assert model_path(types.SimpleNamespace(modelPath=bundle / picked)) == str(bundle)
