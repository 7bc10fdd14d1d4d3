import enum
import pathlib
from typing import Annotated

import qt
import vtk

import slicer
from slicer import (vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#
# XAIOverlay
#


class XAIOverlay(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("XAI Overlay")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Explainable AI")]
        self.parent.dependencies = []
        self.parent.contributors = ["XAIOverlay developers"]
        self.parent.helpText = _("""
Explain a 3D imaging model (nnU-Net folder, MONAI bundle, state dict + spec, TorchScript) on the scene's volumes:
Grad-CAM, LRP, occlusion and more as colour-mapped overlays, compared side by side in linked views,
with a table of runtime and quality per method; then click to the next case.
Documentation: the "3D Slicer module" section of the extension's README (its source is at the
extension's homepage, shown in the Extensions Manager).
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer, MONAI and PyTorch. The explanation engine runs in a separate worker process
(PythonSlicer -m xaioverlay.worker) so that Slicer stays responsive.
""")


#
# Parameters
#


class Device(enum.Enum):
    Auto = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Score(enum.Enum):
    Logit = "logit"
    Probability = "probability"


class Region(enum.Enum):
    Predicted = "predicted"
    Segment = "segment"
    ROI = "roi"
    Point = "point"


class Orientation(enum.Enum):
    Axial = "Axial"
    Coronal = "Coronal"
    Sagittal = "Sagittal"


@parameterNodeWrapper
class XAIOverlayParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    channel2Volume: vtkMRMLScalarVolumeNode
    channel3Volume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path
    nnunetFolds: str = ""
    device: Device = Device.Auto
    methods: str = "gradcam,lrp,occlusion"
    camLayer: str = ""
    segments: str = ""
    targetClass: str = ""
    targetRegion: Region = Region.Predicted
    targetSegmentation: vtkMRMLSegmentationNode
    targetSegment: str = ""
    targetROI: vtkMRMLMarkupsROINode
    targetPoint: vtkMRMLMarkupsFiducialNode
    targetRadius: Annotated[float, WithinRange(0.0, 100.0)] = 10.0
    score: Score = Score.Logit
    measureQuality: bool = False
    referenceSegmentation: vtkMRMLSegmentationNode
    thresholdPercentile: Annotated[float, WithinRange(50.0, 99.9)] = 95.0
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6
    orientation: Orientation = Orientation.Axial
    showOutline: bool = True
    showIn3D: bool = False
    caseFolder: pathlib.Path
    pinCase: bool = False
    prepareNext: bool = True


#
# XAIOverlayWidget
#


class XAIOverlayWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self.onTimer)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/XAIOverlay.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = XAIOverlayLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onExplain)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compareButton.connect("clicked(bool)", lambda: self.onCompare())
        self.ui.describeButton.connect("clicked(bool)", self.onDescribe)
        self.ui.modelFolderButton.connect("clicked(bool)", self.onChooseModelFolder)
        self.ui.loadFolderButton.connect("clicked(bool)", self.onCasesFromFolder)
        self.ui.useSceneButton.connect("clicked(bool)", self.onCasesFromScene)
        self.ui.previousButton.connect("clicked(bool)", lambda: self.onStep(-1))
        self.ui.nextButton.connect("clicked(bool)", lambda: self.onStep(+1))
        self.ui.classComboBox.connect("activated(int)", self.onClassChosen)
        self.ui.methodsListWidget.connect("itemChanged(QListWidgetItem*)", self.onMethodToggled)
        self.ui.comparisonTableView.connect("clicked(QModelIndex)", self.onTableRow)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if str(self._parameterNode.modelPath) in ("", ".") and self.logic.demoModel():
            self._parameterNode.modelPath = self.logic.demoModel()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersChanged)
            self.onParametersChanged()

    def onParametersChanged(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        running = self._job is not None and not self._job.finished
        self.ui.applyButton.enabled = bool(parameters.inputVolume) and not running
        self.ui.cancelButton.enabled = running
        region = parameters.targetRegion
        for widget, shown in ((self.ui.targetSegmentationSelector, region == Region.Segment),
                              (self.ui.targetSegmentLineEdit, region == Region.Segment),
                              (self.ui.targetROISelector, region == Region.ROI),
                              (self.ui.targetPointSelector, region == Region.Point),
                              (self.ui.targetRadiusSlider, region == Region.Point)):
            widget.enabled = shown
        self.logic.applyDisplay(parameters)
        if self.logic._core is not None and self.logic.core.busy and not self._timer.isActive():
            self._timer.start()  # a threshold change is applied at the next tick

    # --- model and methods -------------------------------------------------------------------------
    def onChooseModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(self.parent, _("Choose a MONAI bundle folder"),
                                                     str(self._parameterNode.modelPath))
        if folder:
            self._parameterNode.modelPath = pathlib.Path(folder)

    def onDescribe(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot read the model."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.modelInfoLabel.text = _("reading the model…")  # the answer comes through the timer
            self.logic.describe(self._parameterNode, self.onModelDescribed, slicer.util.errorDisplay)
            self._timer.start()

    def onModelDescribed(self, info) -> None:
        classes = ", ".join(info["class_names"])
        self.ui.modelInfoLabel.text = f"{info['task']}, {classes} ({info['format']}, {info['device']})"
        self.ui.classComboBox.clear()
        self.ui.classComboBox.addItem(_("(model's default)"), "")
        for name in info["class_names"]:
            self.ui.classComboBox.addItem(name, name)
        chosen = self.logic.reconcileMethods(self._parameterNode, info)
        self.ui.methodsListWidget.blockSignals(True)
        self.ui.methodsListWidget.clear()
        for method in info["methods"]:
            item = qt.QListWidgetItem(f"{method['label']} — {method['summary']}")
            item.setData(qt.Qt.UserRole, method["spec"])
            flags = qt.Qt.ItemIsUserCheckable
            if method["allowed"]:
                flags |= qt.Qt.ItemIsEnabled
            elif method.get("reason"):
                item.setToolTip(method["reason"])  # why it is greyed out, e.g. no attention in this network
            item.setFlags(flags)
            checked = method["spec"] in chosen or method["name"] in chosen
            item.setCheckState(qt.Qt.Checked if checked else qt.Qt.Unchecked)
            self.ui.methodsListWidget.addItem(item)
        self.ui.methodsListWidget.blockSignals(False)

    def onClassChosen(self, index) -> None:
        self._parameterNode.targetClass = self.ui.classComboBox.itemData(index) or ""

    def onMethodToggled(self, item) -> None:
        specs = [self.ui.methodsListWidget.item(row).data(qt.Qt.UserRole) for row in range(self.ui.methodsListWidget.count)
                 if self.ui.methodsListWidget.item(row).checkState() == qt.Qt.Checked]
        self._parameterNode.methods = ",".join(specs)

    # --- explain, progress, cancel -----------------------------------------------------------------
    def onExplain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the explanation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self._start(self.logic.explain(self._parameterNode))

    def _start(self, job) -> None:
        self._job = job
        self.ui.progressBar.setValue(0)
        self._timer.start()
        self.onTimer()

    def onCancel(self) -> None:
        if self._job is not None:
            self.logic.core.cancel(self._job)

    def onTimer(self) -> None:
        self.logic.core.process_events()
        job = self._job
        if job is None:
            if not self.logic.core.busy:  # the background work for the next case is done too
                self._timer.stop()
            return
        done, total, unit = job.progress
        self.ui.progressBar.setMaximum(max(total, 1))
        self.ui.progressBar.setValue(done if not job.finished else max(total, 1))
        self.ui.statusLabel.text = job.status
        if job.finished:
            self._job = None  # the timer keeps polling while the next case is prepared in the background
            self.onParametersChanged()
            if job.state == "failed" or job.warnings:  # an error, or e.g. non-finite values in a map
                display = slicer.util.errorDisplay if job.state == "failed" else slicer.util.warningDisplay
                display(job.error or "\n".join(job.warnings), windowTitle=_("XAIOverlay"))
            if job.state == "done":
                self.onCompare(job)
        else:
            self.onParametersChanged()

    # --- compare -----------------------------------------------------------------------------------
    def onCompare(self, job=None) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show the comparison."), waitCursor=True):
            table = self.logic.compare(self._parameterNode, job)
            self.ui.comparisonTableView.setMRMLTableNode(table)

    def onTableRow(self, index) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot show this method."), waitCursor=True):
            self.logic.showRow(self._parameterNode, self.ui.comparisonTableView.mrmlTableNode(), index.row())

    # --- cases -------------------------------------------------------------------------------------
    def onCasesFromFolder(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot read the case folder."), waitCursor=True):
            self.logic.useCases(self._parameterNode, fromFolder=True)
            self._showCase()

    def onCasesFromScene(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot list the scene's volumes."), waitCursor=True):
            self.logic.useCases(self._parameterNode, fromFolder=False)
            self._showCase()

    def onStep(self, step) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot open the case."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            volume, job = self.logic.step(self._parameterNode, step)
            self._showCase()
            if job is not None:
                self._start(job)

    def _showCase(self) -> None:
        browser = self.logic.core.browser
        if browser and browser.current:
            self.ui.caseLabel.text = f"{browser.index + 1} / {len(browser.cases)}: {browser.current.name}"


#
# XAIOverlayLogic
#


class XAIOverlayLogic(ScriptedLoadableModuleLogic):
    """Parameters → the MRML logic of XAIOverlayLib (which scripts and tests use directly)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._core = None

    def getParameterNode(self):
        return XAIOverlayParameterNode(super().getParameterNode())

    @property
    def core(self):
        if self._core is None:
            from XAIOverlayLib.logic import OverlayLogic

            layoutManager = slicer.app.layoutManager()
            self._core = OverlayLogic(
                slicer.mrmlScene, cache_root=pathlib.Path(slicer.app.cachePath) / "XAIOverlay",
                layout_node=layoutManager.layoutLogic().GetLayoutNode() if layoutManager else None,
                application_logic=slicer.app.applicationLogic(),
                volume_rendering_logic=slicer.modules.volumerendering.logic(),
            )
        return self._core

    def shutdown(self) -> None:
        if self._core is not None:
            self._core.shutdown()

    @staticmethod
    def demoModel():
        """The demo classifier bundle: in the module's resources (installed) or the source tree's."""
        here = pathlib.Path(__file__).resolve().parent
        for root in (here, here.parent):
            path = root / "Resources" / "bundles" / "tumour_classifier"
            if path.is_dir():
                return path
        return None

    def ensureDependencies(self) -> bool:
        """Install PyTorch, MONAI, ... on first use (asks first); False if the user declined."""
        from XAIOverlayLib.dependencies import ensure_in_slicer

        return ensure_in_slicer()

    def describe(self, parameters, then=None, failed=None):  # returns at once: see OverlayLogic.describe
        from XAIOverlayLib.logic import model_options, model_path

        return self.core.describe(model_path(parameters), parameters.device.value, then, failed,
                                  options=model_options(parameters))

    @staticmethod
    def reconcileMethods(parameters, info) -> set:
        """The chosen method specs; replaced by the model's defaults when some are unknown to the engine
        or refused by the model (e.g. CAMs on TorchScript)."""
        known = {method["name"] for method in info["methods"] if method["allowed"]}
        chosen = {spec for spec in parameters.methods.replace(" ", "").split(",") if spec}
        if not chosen or any(spec.split(":")[0] not in known for spec in chosen):
            parameters.methods = ",".join(info["default_methods"])
            chosen = set(info["default_methods"])
        return chosen

    def explain(self, parameters):
        from XAIOverlayLib.logic import request_from_parameters

        self.applyDisplay(parameters)
        return self.core.explain(request_from_parameters(parameters))

    def applyDisplay(self, parameters) -> None:
        if self._core is None:
            return
        core = self.core
        core.prefetch_next = parameters.prepareNext
        if abs(core.percentile - parameters.thresholdPercentile) > 1e-6:
            core.set_percentile(parameters.thresholdPercentile, coalesce=True)  # restyled once per timer tick
        if abs(core.opacity - parameters.opacity) > 1e-6:
            core.set_opacity(parameters.opacity)
        core.set_orientation(parameters.orientation.value)
        if parameters.inputVolume is not None:
            core.pin(parameters.inputVolume, parameters.pinCase)

    def compare(self, parameters, job=None):
        core = self.core
        job = job or core.last_job
        if job is None:
            raise ValueError(_("nothing to compare yet; press Explain first"))
        return core.show_compare(job, parameters.orientation.value, outline=parameters.showOutline, show_3d=parameters.showIn3D)

    def showRow(self, parameters, table, row) -> None:
        from XAIOverlayLib import compare

        volume = compare.map_for_row(slicer.mrmlScene, table, row)
        if volume is not None:
            self.core.select(volume, show_3d=parameters.showIn3D)

    def useCases(self, parameters, fromFolder: bool):
        from XAIOverlayLib import cases

        if fromFolder and str(parameters.caseFolder) in ("", "."):
            raise ValueError(_("choose the case folder first"))
        found = cases.cases_from_folder(parameters.caseFolder) if fromFolder else cases.cases_from_scene(slicer.mrmlScene)
        return self.core.set_cases(found)

    def step(self, parameters, step: int):
        from XAIOverlayLib.logic import request_from_parameters

        volume, job = self.core.open_case(step, request_from_parameters(parameters))  # the case replaces the input
        # both at once: each change alone would pin or unpin the wrong case (applyDisplay runs on every change)
        wasModifying = parameters.parameterNode.StartModify()
        try:
            parameters.inputVolume = volume
            parameters.pinCase = volume.GetID() in self.core.pinned
        finally:
            parameters.parameterNode.EndModify(wasModifying)
        return volume, job


#
# XAIOverlayTest
#


class XAIOverlayTest(ScriptedLoadableModuleTest):
    """Inside Slicer: a demo phantom through the whole module (explain → compare → next case)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_demo_phantom_through_the_module()

    def test_demo_phantom_through_the_module(self):
        import tempfile

        import numpy as np

        from XAIOverlayLib import nodes
        from xaioverlay.demo import DEMO_SEED
        from xaioverlay.phantoms import make_phantom
        from xaioverlay.volumes import write_volume

        logic = XAIOverlayLogic()
        self.assertTrue(logic.ensureDependencies(), "PyTorch and MONAI are needed for this test")
        self.assertIsNotNone(logic.demoModel(), "the demo bundles are missing from Resources/bundles")
        folder = pathlib.Path(tempfile.mkdtemp())
        phantoms = [make_phantom(DEMO_SEED + index) for index in range(2)]
        for index, phantom in enumerate(phantoms):
            write_volume(phantom.image, folder / f"phantom_{index}.nrrd")
        parameters = logic.getParameterNode()
        parameters.modelPath = logic.demoModel()
        parameters.methods = "gradcam,hirescam,gradcampp"
        parameters.targetClass = "tumour"
        parameters.caseFolder = folder
        parameters.prepareNext = True
        logic.useCases(parameters, fromFolder=True)
        volume, job = logic.step(parameters, 0)
        logic.core.wait(job)
        self.assertEqual(job.state, "done", job.error)
        maps = logic.core.map_nodes(job)
        self.assertEqual(len(maps), 3)
        for node in maps:
            np.testing.assert_allclose(nodes.ijk_to_ras(node), nodes.ijk_to_ras(volume), atol=1e-6)
        table = logic.compare(parameters, job)
        self.assertEqual(table.GetTable().GetNumberOfRows(), 3)
        self.delayDisplay("compare layout shown")
        background = [j for j in logic.core.jobs.values() if j.background]
        self.assertEqual(len(background), 1, "the next case should be prepared in the background")
        logic.core.wait(background[0])
        volume, job = logic.step(parameters, +1)
        self.assertEqual((logic.core.wait(job, 30).state, job.request_id), ("done", None), job.error)
        logic.shutdown()
        self.delayDisplay("Test passed")
