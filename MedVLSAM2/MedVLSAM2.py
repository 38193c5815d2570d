"""MedVLSAM2 — the 3D Slicer module: report, VQA chat and prompt-driven segmentation of the selected CT.

Slicer glue only: no model code lives here. Top-level imports are stdlib and Slicer toolkits; the library
(``MedVLSAM2Lib``) and the Qt-free node logic (``MedVLSAM2Core``) are imported inside methods, after the user has
installed the dependencies with the *Install dependencies* button. The Widget is thin: it reads the panels, hands
nodes to the Logic, and runs the backend call on the persistent worker thread of ``MedVLSAM2Core.jobs`` (progress,
Cancel) while every MRML read and write stays on the main thread.
"""

import html
import importlib
import importlib.util
import logging
import os
import sys

import qt
import slicer
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MINIMUM_SLICER = (5, 10)  # Python 3.12 in Slicer; MedVLSAM2Lib needs Python 3.10+
ANSWER_KINDS = [("Short answer", "short"), ("Long answer", "long"), ("Multiple choice", "choice")]
POLL_MS, POLL_WAIT_S = 50, 0.02  # each tick the main thread waits (GIL released) 20 ms for the worker
UPDATE_DELAY_MS = 150  # "update on each prompt": prompts placed within this time give one update
PROMPT_NODES = {  # role: (class, name, colour)
    "positive": ("vtkMRMLMarkupsFiducialNode", "MedVLSAM2 positive points", (0.2, 0.8, 0.2)),
    "negative": ("vtkMRMLMarkupsFiducialNode", "MedVLSAM2 negative points", (0.9, 0.2, 0.2)),
    "roi": ("vtkMRMLMarkupsROINode", "MedVLSAM2 box", (1.0, 0.8, 0.1)),
}
SHORTCUTS = {"p": "positive", "n": "negative", "b": "roi"}  # key: which prompt the next click places


def slicerTooOld():
    """A message for a Slicer older than :data:`MINIMUM_SLICER`, else ``None``."""
    have = (slicer.app.majorVersion, slicer.app.minorVersion)
    if have >= MINIMUM_SLICER:
        return None
    return (f"MedVLSAM2 needs 3D Slicer {MINIMUM_SLICER[0]}.{MINIMUM_SLICER[1]} or later (Python 3.10+); this is "
            f"Slicer {have[0]}.{have[1]} with Python {sys.version.split()[0]}. Install a newer Slicer.")  # fmt: skip


def addLibraryPath():
    """Installed, MedVLSAM2Lib sits beside this file; in a source checkout (the module folder added to Slicer's
    module paths) it sits one folder up: put that folder on sys.path so the module finds it."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if importlib.util.find_spec("MedVLSAM2Lib") is None and os.path.isfile(
        os.path.join(checkout, "MedVLSAM2Lib", "__init__.py")
    ):
        sys.path.insert(0, checkout)


@parameterNodeWrapper
class MedVLSAM2ParameterNode:
    """The module's inputs, saved with the scene (the .ui widgets bind to these by ``SlicerParameterName``)."""

    inputVolume: vtkMRMLScalarVolumeNode
    positivePoints: vtkMRMLMarkupsFiducialNode
    negativePoints: vtkMRMLMarkupsFiducialNode
    roi: vtkMRMLMarkupsROINode
    segmentation: vtkMRMLSegmentationNode
    segmentText: str = ""
    updateOnPrompt: bool = False


class MedVLSAM2(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        addLibraryPath()
        self.parent.title = "MedVLSAM2"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["MedVLSAM2 developers"]
        self.parent.helpText = (
            "MedVL-SAM2 reads CT volumes: radiology report generation, VQA chat, and segmentation from a "
            "structure name, a free-text description, points and a box (ROI). Runs locally (GPU recommended) "
            "or on a remote MedVLSAM2 server."
        )
        tooOld = slicerTooOld()
        if tooOld:
            logging.error(tooOld)
            self.parent.helpText = f"{tooOld}\n\n{self.parent.helpText}"
        self.parent.acknowledgementText = (
            "Builds on M3D-CLIP, InternVL2.5, SAM2 and 3D Slicer. Test data courtesy of TotalSegmentator, "
            "dcmqi and slicerio."
        )


class MedVLSAM2Logic(ScriptedLoadableModuleLogic):
    """Backend setup and the node work (delegated to ``MedVLSAM2Core.SceneLogic``); usable without the Widget."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = None

    def getParameterNode(self):
        """The module's parameter node in the scene (made on first use)."""
        return MedVLSAM2ParameterNode(super().getParameterNode())

    @property
    def scene(self):
        """The Qt-free node logic (created on first use, after the dependencies are installed)."""
        if self._scene is None:
            from MedVLSAM2Core import SceneLogic

            self._scene = SceneLogic()
        return self._scene

    @staticmethod
    def installPlan(remote):
        """What the chosen backend still needs (``MedVLSAM2Core.dependencies``; versions read without importing)."""
        from MedVLSAM2Core.dependencies import install_plan, installed_versions

        return install_plan(installed_versions(), remote)

    @staticmethod
    def installDependencies(remote):
        """Install what the backend needs (called only after the user confirmed), by SlicerTotalSegmentator's rules:
        torch from the PyTorch extension with a version floor, Slicer's own packages pinned by a constraints file
        and never installed, sam2 without CUDA and without dependencies."""
        import tempfile

        plan = MedVLSAM2Logic.installPlan(remote)
        if plan.problem:
            raise RuntimeError(plan.problem)
        if plan.torch:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise RuntimeError("MedVLSAM2 needs the PyTorch extension: install it from the Extensions Manager, "
                                   "restart Slicer, then click Install dependencies again.") from error  # fmt: skip
            version = plan.torch.removeprefix("torch")
            if (
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=version)
                is None
            ):
                raise RuntimeError("PyTorch was not installed; MedVLSAM2 needs it to run locally.")
            plan = MedVLSAM2Logic.installPlan(remote)  # pin the torch that was just installed
        with tempfile.TemporaryDirectory() as folder:
            constraints = os.path.join(folder, "constraints.txt")
            with open(constraints, "w") as handle:
                handle.write("\n".join(plan.constraints) + "\n")
            if plan.pip:
                slicer.util.pip_install(["-c", constraints, *plan.pip])
            if plan.sam2:
                from MedVLSAM2Core.dependencies import SAM2_REQUIREMENT

                os.environ["SAM2_BUILD_CUDA"] = "0"  # Python-only sam2: no CUDA extension to compile
                slicer.util.pip_install(["--no-deps", "--no-build-isolation", "-c", constraints, SAM2_REQUIREMENT])
        importlib.invalidate_caches()

    def loadLocal(self, weights, device):
        """Load the model from a weights folder (or a preset name) onto ``device`` and use it; returns its facts."""
        self.scene.backend = self.createLocal(weights, device)
        return self.scene.backend.describe()

    @staticmethod
    def createLocal(weights, device, cancel=None):
        """An InferenceEngine over a weights folder (or a preset name) on ``device`` (auto, cuda, cpu), warmed up
        (``InferenceEngine.warmup``) so that the first request is as fast as the next; ``cancel`` (a
        ``threading.Event``) stops loading and warming between their steps. Call it on the worker thread: the one
        that runs the requests then holds the warm per-thread CUDA state."""
        import torch

        from MedVLSAM2Lib.engine import InferenceEngine

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
        engine = InferenceEngine.load(weights, device=device, dtype=dtype, cancel=cancel)
        engine.warmup(cancel=cancel)
        return engine

    @staticmethod
    def createRemote(url, apiKey):
        """A client of a MedVLSAM2 server, checked by asking its capabilities; the key stays in memory only."""
        from MedVLSAM2Lib.serving.client import ServerClient

        client = ServerClient(url, apiKey or None)
        client.describe()
        return client

    @property
    def serverUrl(self):
        """The server's URL when the backend is remote, else ``None``."""
        return getattr(self.scene.backend, "url", None)

    @staticmethod
    def exportDicomSeg(segmentationNode, volumeNode, folder):
        """Write ``segmentationNode`` as a DICOM Segmentation into ``folder`` with Slicer's DICOM Segmentation
        plugin, referencing the series ``volumeNode`` was loaded from (the reference volume is set first)."""
        try:
            import DICOMSegmentationPlugin
        except ImportError as error:
            raise RuntimeError("DICOM SEG export needs Slicer's DICOM Segmentation plugin (the Quantitative"
                               "Reporting extension): install it from the Extensions Manager.") from error  # fmt: skip
        if not volumeNode.GetAttribute("DICOM.instanceUIDs"):
            raise RuntimeError(f"{volumeNode.GetName()} was not loaded from DICOM, so a DICOM SEG has no series to "
                               "reference: load the CT with the DICOM module, or save the segmentation as "
                               ".seg.nrrd instead.")  # fmt: skip
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        role = segmentationNode.GetReferenceImageGeometryReferenceRole()
        segmentationNode.SetNodeReferenceID(role, volumeNode.GetID())
        hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
        segmentationItem = hierarchy.GetItemByDataNode(segmentationNode)
        hierarchy.SetItemParent(segmentationItem, hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volumeNode)))
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(segmentationItem)
        if not exportables:
            raise RuntimeError(f"Slicer's DICOM plugin cannot export {segmentationNode.GetName()} (it needs at least "
                               "one non-empty segment on the CT's grid).")  # fmt: skip
        for exportable in exportables:
            exportable.directory = folder
        error = exporter.export(exportables)
        if error:
            raise RuntimeError(f"DICOM SEG export failed: {error}")


class MedVLSAM2Widget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panels: Setup, Input, Report, Chat, Segment; long work on a worker thread with progress and Cancel."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._job = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._updatePending = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        tooOld = slicerTooOld()
        if tooOld:
            self.layout.addWidget(qt.QLabel(tooOld))
            return
        from MedVLSAM2Core.jobs import JobRunner
        from MedVLSAM2Core.prompt_watch import PromptWatcher

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedVLSAM2.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedVLSAM2Logic()
        self.runner = JobRunner()
        self.history = []
        self.uploadConsent = set()
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_MS)
        self.pollTimer.timeout.connect(self.poll)
        self.updateTimer = qt.QTimer()
        self.updateTimer.setSingleShot(True)
        self.updateTimer.setInterval(UPDATE_DELAY_MS)
        self.updateTimer.timeout.connect(self.onPromptUpdate)
        self.promptWatcher = PromptWatcher(self.onPromptChanged)
        for name in ("auto", "cuda", "cpu"):
            self.ui.deviceCombo.addItem(name)
        for text, kind in ANSWER_KINDS:
            self.ui.answerKindCombo.addItem(text, kind)
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.localRadio.toggled.connect(self.updateSetup)
        self.ui.installButton.clicked.connect(self.onInstall)
        self.ui.connectButton.clicked.connect(self.onConnect)
        self.ui.reportButton.clicked.connect(self.onReport)
        self.ui.copyReportButton.clicked.connect(self.onCopyReport)
        self.ui.saveReportButton.clicked.connect(self.onSaveReport)
        self.ui.askButton.clicked.connect(self.onAsk)
        self.ui.questionEdit.returnPressed.connect(self.onAsk)
        self.ui.clearChatButton.clicked.connect(self.onClearChat)
        self.ui.segmentButton.clicked.connect(lambda: self.onSegment())
        self.ui.refineButton.clicked.connect(lambda: self.onSegment(refine=True))
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.redoButton.clicked.connect(self.onRedo)
        self.ui.exportDicomSegButton.clicked.connect(self.onExportDicomSeg)
        self.ui.cancelButton.clicked.connect(self.onCancel)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.updateSegments)
        self.ui.volumeSelector.currentNodeChanged.connect(lambda _: self.onClearChat())  # history is per volume
        for selector in (self.ui.positivePointsSelector, self.ui.negativePointsSelector, self.ui.roiSelector):
            selector.currentNodeChanged.connect(lambda _: self.updatePromptNodes())
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addCompletion()
        self.updateSetup()
        self.initializeParameterNode()

    # ------------------------------------------------------------------ lifecycle

    def cleanup(self):
        """The module is closed or Slicer quits: stop the timers, the prompt observers, the shortcuts and the
        worker (a running job is cancelled at its next check; its result is dropped)."""
        self.removeObservers()
        self.setShortcuts(False)
        if not hasattr(self, "runner"):
            return
        self.pollTimer.stop()
        self.updateTimer.stop()
        self.promptWatcher.stop()
        self.runner.close()
        self._job = None
        self.setParameterNode(None)

    def enter(self):
        if not hasattr(self, "runner"):  # a too old Slicer: the panel only says so
            return
        self.initializeParameterNode()
        self.setShortcuts(True)

    def exit(self):
        self.setShortcuts(False)
        if not hasattr(self, "runner"):
            return
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget, self.ui.roiPlaceWidget):
            placeWidget.setPlaceModeEnabled(False)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.onCancel()

    def onSceneEndClose(self, caller, event):
        """A closed scene takes its patient with it: the chat, the report, every upload consent and the undo
        history are reset; a fresh parameter node follows."""
        self.onClearChat()
        self.ui.reportText.clear()
        self.uploadConsent.clear()
        self.logic.scene.forgetHistory()
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Bind the panels to the scene's parameter node; pick the first CT and make the three prompt lists."""
        self.setParameterNode(self.logic.getParameterNode())
        parameters = self._parameterNode
        if not parameters.inputVolume:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        for role, attribute in (("positive", "positivePoints"), ("negative", "negativePoints"), ("roi", "roi")):
            if not getattr(parameters, attribute):
                setattr(parameters, attribute, self.newPromptNode(role))
        self.updatePromptNodes()

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)

    @staticmethod
    def newPromptNode(role):
        """A markups node for one kind of prompt, named and coloured for it."""
        className, name, colour = PROMPT_NODES[role]
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*colour)
        node.GetDisplayNode().SetActiveColor(*colour)
        return node

    def updatePromptNodes(self):
        """The place widgets follow the chosen prompt lists; "update on each prompt" watches them."""
        nodes = (self.ui.positivePointsSelector.currentNode(), self.ui.negativePointsSelector.currentNode(),
                 self.ui.roiSelector.currentNode())  # fmt: skip
        placeWidgets = (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget, self.ui.roiPlaceWidget)
        for placeWidget, node in zip(placeWidgets, nodes, strict=True):
            placeWidget.setCurrentNode(node)
        self.promptWatcher.watch(nodes)

    def setShortcuts(self, enabled):
        """P, N, B: place a positive point, a negative point, the box (while the module is shown)."""
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []
        if not enabled:
            return
        placeWidgets = {"positive": self.ui.positivePlaceWidget, "negative": self.ui.negativePlaceWidget,
                        "roi": self.ui.roiPlaceWidget}  # fmt: skip
        for key, role in SHORTCUTS.items():
            shortcut = qt.QShortcut(qt.QKeySequence(key), slicer.util.mainWindow())
            shortcut.activated.connect(lambda placeWidget=placeWidgets[role]: placeWidget.setPlaceModeEnabled(True))
            self._shortcuts.append(shortcut)

    def addCompletion(self):
        """Complete structure names in the Segment prompt from the terminology table (numpy-free import)."""
        from MedVLSAM2Lib.terminology import structure_names

        completer = qt.QCompleter(structure_names(), self.ui.segmentTextEdit)
        completer.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.segmentTextEdit.setCompleter(completer)

    # ------------------------------------------------------------------ setup

    def updateSetup(self):
        local = self.ui.localRadio.checked
        for widget in (self.ui.weightsPathEdit, self.ui.deviceCombo):
            widget.enabled = local
        for widget in (self.ui.serverUrlEdit, self.ui.apiKeyEdit):
            widget.enabled = not local
        plan = MedVLSAM2Logic.installPlan(remote=not local)
        self.ui.installButton.enabled = not plan.empty
        if plan.problem:
            self.ui.backendStatusLabel.text = plan.problem
        elif not plan.empty:
            self.ui.backendStatusLabel.text = f"missing: {', '.join(plan.missing())} (click Install dependencies)"
        elif self.logic.scene.backend is None:
            self.ui.backendStatusLabel.text = "dependencies present; load the model or connect"

    def onInstall(self):
        remote = not self.ui.localRadio.checked
        what = "the client packages" if remote else "PyTorch (via the PyTorch extension) and the model's packages"
        if not slicer.util.confirmOkCancelDisplay(f"MedVLSAM2 will install {what} into Slicer's Python. "
                                                  "This can take several minutes. Continue?"):  # fmt: skip
            return
        with slicer.util.tryWithErrorDisplay("Installing the dependencies failed.", waitCursor=True):
            MedVLSAM2Logic.installDependencies(remote)
            self.ui.backendStatusLabel.text = "dependencies installed"
        self.updateSetup()

    def onConnect(self):
        if self.ui.localRadio.checked:
            weights = self.ui.weightsPathEdit.currentPath
            device = self.ui.deviceCombo.currentText
            self.run("Loading the model", lambda job: MedVLSAM2Logic.createLocal(weights, device, job.cancel),
                     self.onBackendReady)  # fmt: skip
        else:
            url, key = self.ui.serverUrlEdit.text, self.ui.apiKeyEdit.text
            self.run("Connecting", lambda _: MedVLSAM2Logic.createRemote(url, key), self.onBackendReady)

    def onBackendReady(self, backend):
        """Runs on the main thread once loading or connecting succeeded (a cancelled one never gets here)."""
        self.logic.scene.backend = backend
        description = backend.describe()
        status = ", ".join(f"{k}: {v}" for k, v in description.items() if k in ("preset", "device", "dtype", "server"))
        if getattr(backend, "warmup_seconds", None) is not None:  # a local engine: how long it took to be ready
            status += f"; loaded in {backend.load_seconds:.1f} s, warm in {backend.warmup_seconds:.1f} s"
        self.ui.backendStatusLabel.text = status

    def consentToUpload(self, volumeNode):
        """Ask once per volume before its voxels leave this computer for a remote server."""
        server = self.logic.serverUrl
        if server is None or (server, volumeNode.GetID()) in self.uploadConsent:
            return True
        if slicer.util.confirmYesNoDisplay(f"Send the voxels of '{volumeNode.GetName()}' to the server "
                                           f"{server}? Only do this if the server may "
                                           "receive this patient's data."):  # fmt: skip
            self.uploadConsent.add((server, volumeNode.GetID()))
            return True
        return False

    # ------------------------------------------------------------------ running work off the UI thread

    def run(self, title, work, done):
        """Run ``work(job)`` on the worker thread (``job.cancel`` is the flag to hand to the backend,
        ``job.progress(text)`` streams text into the panel); ``done(result)`` runs on the main thread."""
        if self.runner.busy:
            slicer.util.errorDisplay("MedVLSAM2 is still busy; wait or press Cancel.")
            return False
        self._job = (self.runner.submit(title, work), done)
        self.ui.statusLabel.text = f"{title}…"
        self.ui.progressBar.setRange(0, 0)
        self.ui.cancelButton.enabled = True
        self.pollTimer.start()
        return True

    def poll(self):
        """Each tick: wait briefly for the worker (releasing the GIL), then show what it reported."""
        if self._job is None:
            self.pollTimer.stop()
            return
        job, done = self._job
        for event in job.events(wait=POLL_WAIT_S):
            if event.kind == "progress":
                self.onProgress(event.value)
                continue
            self.pollTimer.stop()
            self._job = None
            self.ui.progressBar.setRange(0, 1)
            self.ui.progressBar.value = 1 if event.kind == "done" else 0
            self.ui.cancelButton.enabled = False
            self.ui.statusLabel.text = {"done": f"{job.title}: done", "cancelled": f"{job.title}: cancelled",
                                        "error": f"{job.title}: failed"}[event.kind]  # fmt: skip
            if event.kind == "done":
                with slicer.util.tryWithErrorDisplay(f"{job.title} failed."):
                    done(event.value)
            elif event.kind == "error":
                slicer.util.errorDisplay(f"{job.title} failed: {event.value}")
            if self._updatePending:
                self._updatePending = False
                self.updateTimer.start()
            return

    def onProgress(self, text):
        self.ui.reportText.moveCursor(qt.QTextCursor.End)  # append, whatever the user selected meanwhile
        self.ui.reportText.insertPlainText(text)

    def onCancel(self):
        if self._job is not None:
            self._job[0].cancel.set()
            self._updatePending = False
            self.ui.statusLabel.text = f"{self._job[0].title}: cancelling…"

    # ------------------------------------------------------------------ panels

    def _volume(self):
        volumeNode = self.ui.volumeSelector.currentNode()
        if volumeNode is None:
            slicer.util.errorDisplay("Select a CT volume in Input first.")
            return None
        return volumeNode if self.consentToUpload(volumeNode) else None

    def _inputs(self, volumeNode, what):
        """``(volume, backend)`` for a job, or ``None`` after telling the user what is missing."""
        from MedVLSAM2Lib.errors import MedVLSAM2Error

        try:
            return self.logic.scene.volumeFromNode(volumeNode), self.logic.scene.requireBackend()
        except MedVLSAM2Error as err:
            slicer.util.errorDisplay(f"{what}: {err}")
            return None

    def onReport(self):
        volumeNode = self._volume()
        if volumeNode is None:
            return
        scene, inputs = self.logic.scene, self._inputs(volumeNode, "Cannot generate a report")
        if inputs is None or self.runner.busy:
            return
        volume, backend = inputs
        self.ui.reportText.clear()

        def work(job):
            handle = backend.encode(volume, scene.intensity, cancel=job.cancel)
            return backend.report(handle, on_token=job.progress, cancel=job.cancel)

        self.run("Generating the report", work, lambda report: self.ui.reportText.setPlainText(report.text))

    def onCopyReport(self):
        qt.QApplication.clipboard().setText(self.ui.reportText.toPlainText())

    def onSaveReport(self):
        path = qt.QFileDialog.getSaveFileName(None, "Save report", "report.txt", "Text (*.txt)")
        if path:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(self.ui.reportText.toPlainText())

    def onAsk(self):
        volumeNode, question = self._volume(), self.ui.questionEdit.text.strip()
        if volumeNode is None or not question:
            return
        kind, scene, history = self.ui.answerKindCombo.currentData, self.logic.scene, list(self.history)
        inputs = self._inputs(volumeNode, "Cannot ask")
        if inputs is None:
            return
        volume, backend = inputs

        def done(answer):
            self.history.append((question, answer.text))
            self.ui.chatHistory.append(f"<b>You:</b> {html.escape(question)}<br><b>MedVLSAM2:</b> "
                                       f"{html.escape(answer.text)}")  # fmt: skip
            self.ui.questionEdit.clear()

        def work(job):
            handle = backend.encode(volume, scene.intensity, cancel=job.cancel)
            return backend.ask(handle, question, history=history, kind=kind, cancel=job.cancel)

        self.run("Answering", work, done)

    def onClearChat(self):
        self.history = []
        self.ui.chatHistory.clear()

    def updateSegments(self, node=None, select=None):
        """List the segments with the model's confidence; ``select`` (a segment id) becomes the current one."""
        current = select or self.ui.segmentCombo.currentData
        self.ui.segmentCombo.clear()
        node = node or self.ui.segmentationSelector.currentNode()
        if node is None:
            return
        segmentation = node.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(n)
            score = self.logic.scene.segmentScore(segment)
            text = f"{segment.GetName()} (confidence {score})" if score else segment.GetName()
            self.ui.segmentCombo.addItem(text, segmentation.GetNthSegmentID(n))
        index = self.ui.segmentCombo.findData(current) if current else -1
        if index >= 0:
            self.ui.segmentCombo.currentIndex = index

    def onSegment(self, refine=False, quiet=False):
        """Segment from the text and the current prompts: a new segment, or (``refine``) into the chosen one.
        ``quiet`` (an automatic update) reports problems in the status line instead of a dialog."""
        from MedVLSAM2Lib.errors import MedVLSAM2Error

        volumeNode = self.ui.volumeSelector.currentNode() if quiet else self._volume()
        if volumeNode is None or (quiet and not self.consentToUpload(volumeNode)):
            return
        segmentationNode = self.ui.segmentationSelector.currentNode()  # None: made once there is a mask
        segmentId = self.ui.segmentCombo.currentData if refine else None
        if refine and not segmentId:
            slicer.util.errorDisplay("Choose the segment to refine first.")
            return
        scene = self.logic.scene
        try:
            request = scene.segmentRequest(
                volumeNode, self.ui.segmentTextEdit.text, self.ui.positivePointsSelector.currentNode(),
                self.ui.negativePointsSelector.currentNode(), self.ui.roiSelector.currentNode())  # fmt: skip
            scene.requireBackend()
        except MedVLSAM2Error as err:
            if not quiet:
                slicer.util.errorDisplay(f"Segmentation: {err}")
            self.ui.statusLabel.text = f"Segmentation: {err}"
            return
        volume = request.pop("volume")
        title = "Refining" if refine else "Segmenting"

        def done(result):
            node = scene.outputSegmentation(segmentationNode, volumeNode)
            self.ui.segmentationSelector.setCurrentNode(node)
            written = scene.writeResult(result, node, volumeNode, segmentId)
            if result.message:  # the mask came from the points or box alone
                self.ui.statusLabel.text = f"{title}: done. {result.message}"
            self.updateSegments(select=written[0])

        self.run(title, lambda job: scene.runSegment(volume, cancel=job.cancel, **request), done)

    def onPromptChanged(self, node):
        """A prompt was placed, moved or removed: with "update on each prompt", re-segment shortly after."""
        if self.ui.updateOnPromptCheckBox.checked and self.logic.scene.backend is not None:
            self.updateTimer.start()

    def onPromptUpdate(self):
        """The debounced update: refine the current segment (a new one if there is none) with the prompts."""
        if self.runner.busy:
            self._updatePending = True  # runs again when the current job ends, with the latest prompts
            return
        self.onSegment(refine=bool(self.ui.segmentCombo.currentData), quiet=True)

    def onUndo(self):
        node = self.ui.segmentationSelector.currentNode()
        if node is None or not self.logic.scene.undo(node):
            self.ui.statusLabel.text = "nothing to undo"
        self.updateSegments()

    def onRedo(self):
        node = self.ui.segmentationSelector.currentNode()
        if node is None or not self.logic.scene.redo(node):
            self.ui.statusLabel.text = "nothing to redo"
        self.updateSegments()

    def onExportDicomSeg(self):
        segmentationNode, volumeNode = self.ui.segmentationSelector.currentNode(), self.ui.volumeSelector.currentNode()
        if segmentationNode is None or volumeNode is None:
            slicer.util.errorDisplay("Select the CT and the segmentation to export first.")
            return
        folder = qt.QFileDialog.getExistingDirectory(None, "Export DICOM SEG to folder")
        if folder:
            with slicer.util.tryWithErrorDisplay("DICOM SEG export failed.", waitCursor=True):
                MedVLSAM2Logic.exportDicomSeg(segmentationNode, volumeNode, folder)
                self.ui.statusLabel.text = f"DICOM SEG written to {folder}"


class MedVLSAM2Test(ScriptedLoadableModuleTest):
    """Reload & Test, the Self Tests module and ctest: the scenario of ``MedVLSAM2Core.self_test`` (also run by
    ``make test`` on slicer-core) on the slicerio chest CT with the tiny preset, through the module Logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segment_with_box_and_points()

    def test_segment_with_box_and_points(self):
        tooOld = slicerTooOld()
        if tooOld:
            self.fail(tooOld)
        plan = MedVLSAM2Logic.installPlan(remote=False)
        if not plan.empty:
            self.skipTest(f"MedVLSAM2's dependencies are not installed ({', '.join(plan.missing()) or plan.problem});"
                          " click Install dependencies in the module, then run the test again.")  # fmt: skip
        from MedVLSAM2Core.self_test import runSelfTest, selfTestInputs

        self.delayDisplay("Loading the slicerio chest CT")
        ctPath, referencePath = selfTestInputs()
        volumeNode = slicer.util.loadVolume(ctPath)
        logic = MedVLSAM2Logic()
        logic.loadLocal("tiny", "cpu")
        self.delayDisplay("Segmenting the right lung from a box and two points (tiny preset, random weights)")
        facts = runSelfTest(logic.scene, volumeNode, referencePath)
        self.delayDisplay(f"MedVLSAM2 self-test passed: {facts['voxels']} voxels on the CT's grid {facts['shape']}")
